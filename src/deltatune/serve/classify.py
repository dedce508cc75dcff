"""Classification: every waiting request's texts in one forward, each row with its request's adapter.

A sequence-classification model (a ``deltatune train`` seq-cls run, or a folder whose architecture is
``...ForSequenceClassification``) gives each text a label and every label's probability. Texts are
cut to ``max_length`` tokens, as in training. The tokenizer is only used on the worker thread: fast
tokenizers change their truncation settings while encoding and must not be shared across threads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..hf import config_value
from .events import Classified, Sink
from .registry import AdapterTable
from .worker import Worker


@dataclass(eq=False)
class ClassifyJob:
    texts: list[str]
    sink: Sink
    adapter: str | None = None
    cancelled: bool = False


def label_names(model: nn.Module) -> list[str]:
    """The label of each class id, from the model's config (a run writes its label set there)."""
    id2label = config_value(model, "id2label") or {}
    count = config_value(model, "num_labels") or len(id2label)
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)]


class ClassifyWorker(Worker):
    name = "classify"

    def __init__(self, model: nn.Module, tokenizer: Any, table: AdapterTable, max_batch_size: int,
                 max_length: int) -> None:
        super().__init__(model, table)
        self.tokenizer, self.max_batch_size, self.max_length = tokenizer, max_batch_size, max_length
        self.labels = label_names(model)
        self._current: list[ClassifyJob] = []

    def running(self) -> Iterable[ClassifyJob]:
        return self._current

    def abandon(self, error: BaseException) -> None:
        for job in self._current:
            self.fail(job, error, "the scheduler")
        self._current = []

    def step(self) -> None:
        """Jobs up to ``max_batch_size`` texts (at least one job, however many texts it has) in one forward."""
        rows = 0

        def fits(job: ClassifyJob) -> bool:
            nonlocal rows
            if rows and rows + len(job.texts) > self.max_batch_size:
                return False
            rows += len(job.texts)
            return True

        self._current = self.take_waiting(self.max_batch_size, fits)
        try:
            self._run(self._current)
        finally:
            self._current = []

    def _run(self, jobs: list[ClassifyJob]) -> None:
        """All ``jobs`` at once; when that fails, each alone, so only a failing request fails."""
        if not jobs:
            return
        try:
            probs, tokens = self._forward(jobs)
        except Exception as error:
            if len(jobs) == 1:
                self.fail(jobs[0], error, "classification")
            else:
                for job in jobs:
                    self._run([job])
            return
        start = 0
        for job, count in zip(jobs, tokens, strict=True):
            chunk = probs[start:start + len(job.texts)]
            start += len(job.texts)
            results = [(int(p.argmax()), self.labels[int(p.argmax())], p.tolist()) for p in chunk]
            job.sink(Classified(results, count))

    @torch.inference_mode()
    def _forward(self, jobs: list[ClassifyJob]) -> tuple[Tensor, list[int]]:
        """Class probabilities of every text (rows in job order) and each job's input token count."""
        texts = [text for job in jobs for text in job.texts]
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        rows = [job.adapter for job in jobs for _ in job.texts]
        self.route.use(rows)
        logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
        if torch.isnan(logits).any():
            raise FloatingPointError("the model's scores are NaN for this input (a broken adapter?)")
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        counts, start = [], 0
        for job in jobs:
            counts.append(int(sum(lengths[start:start + len(job.texts)])))
            start += len(job.texts)
        return torch.softmax(logits.float(), dim=-1).cpu(), counts

    def check_adapter(self, internal: str) -> None:
        """One text through the new adapter: it must route, and fit this model's head."""
        try:
            self._forward([ClassifyJob(["a"], lambda event: None, internal)])
        finally:
            self.release()
