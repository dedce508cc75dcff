"""Generation with continuous batching: requests join and leave the running batch between decode steps.

Each step of the worker thread (1) drops the rows whose client went away, (2) admits waiting requests
up to ``max_batch_size`` rows, prefilling them in one left-padded forward and merging their cache
into the running batch's (``kv``), and (3) runs one decode step for every running row: one forward
of one token per row, each row with its own adapter (``rows.per_row_adapters``). Every row's new token
goes to its request at once (streaming), and a row that ends (end-of-sequence, a stop string,
``max_tokens``) leaves the batch before the next step.

A forward that fails is retried row by row, so only the requests that fail alone fail; the
scheduler goes on with the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import kv as kvs
from .errors import ServeError
from .events import Delta, Done, Sink
from .kv import KvBatch
from .registry import AdapterTable
from .sampling import NonFiniteScores, Sampling, broken_rows, choose, generator_for
from .text import TextStream
from .worker import Worker

Pick = int | BaseException
"""A row's next token, or why it has none."""


@dataclass
class Stats:
    """What the batches looked like (tests and the benchmark read it): decode steps, rows per step, steps
    that mixed adapters, and prompts that joined a batch already running."""

    steps: int = 0
    rows: int = 0
    max_rows: int = 0
    mixed_steps: int = 0
    joined_running: int = 0

    def record(self, adapters: list[str | None]) -> None:
        self.steps += 1
        self.rows += len(adapters)
        self.max_rows = max(self.max_rows, len(adapters))
        self.mixed_steps += len(set(adapters)) > 1


@dataclass(eq=False)
class GenerationJob:
    """One prompt being completed."""

    prompt: list[int]
    sampling: Sampling
    text: TextStream
    sink: Sink
    adapter: str | None = None
    cancelled: bool = False
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.generator = generator_for(self.sampling)


def stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (one or several) and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        ids.update([value] if isinstance(value, int) else list(value or []))
    return ids


class GenerationEngine(Worker):
    """The worker of a text-generation server (see the module docstring)."""

    name = "generate"

    def __init__(self, model: nn.Module, tokenizer: Any, table: AdapterTable, max_batch_size: int) -> None:
        super().__init__(model, table)
        self.tokenizer, self.max_batch_size = tokenizer, max_batch_size
        self.eos = stop_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else min(self.eos, default=0)  # any id: padding is masked
        # only the last position's scores are needed after a prefill; most causal LMs can skip the rest
        self.last_only = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        self.batch: list[GenerationJob] = []
        self.kv: KvBatch | None = None
        self.stats = Stats()

    def running(self) -> Iterable[GenerationJob]:
        return self.batch

    def abandon(self, error: BaseException) -> None:
        for job in self.batch:
            self.fail(job, error, "the scheduler")
        self.batch, self.kv = [], None

    # -- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()  # the cache merges and cuts too: no autograd bookkeeping anywhere in a step
    def step(self) -> None:
        self._drop_cancelled()
        newcomers = self.take_waiting(self.max_batch_size - len(self.batch))
        if newcomers:
            self.stats.joined_running += len(newcomers) if self.batch else 0
            self._start(newcomers)
        if self.batch:
            self._advance()

    def _drop_cancelled(self) -> None:
        keep = [i for i, job in enumerate(self.batch) if not job.cancelled]
        if len(keep) != len(self.batch):
            self._keep(self.batch, self.kv, keep)

    def _keep(self, jobs: list[GenerationJob], kv: KvBatch | None, keep: list[int]) -> None:
        self.batch = [jobs[i] for i in keep]
        self.kv = kvs.select(kv, keep) if kv is not None else None

    def _start(self, jobs: list[GenerationJob]) -> None:
        """Prefill ``jobs`` (alone when the batched prefill fails, so only a failing request fails) and
        admit the ones that go on into the running batch."""
        try:
            kv, logits = self._prefill(jobs)
        except Exception as error:
            if len(jobs) == 1:
                self.fail(jobs[0], error, "the prompt's forward pass")
                return
            for job in jobs:
                self._start([job])
            return
        going = [i for i, (job, pick) in enumerate(zip(jobs, self._pick(logits, jobs), strict=True))
                 if self._deliver(job, pick)]
        joined = kvs.select(kv, going)
        if joined is not None:
            self.kv = kvs.merge(self.kv, joined)
            self.batch += [jobs[i] for i in going]

    def _advance(self) -> None:
        """One decode step of the running batch; on failure, each row again alone."""
        jobs, kv = self.batch, self.kv
        assert kv is not None
        try:
            logits = self._decode(jobs, kv)
        except Exception as error:
            kvs.crop(kv)  # layers that grew before the failure go back to the batch's width
            self.batch, self.kv = [], None
            if len(jobs) == 1:
                self.fail(jobs[0], error, "a decode step")
                return
            for i, job in enumerate(jobs):
                self._advance_alone(job, kvs.select(kv, [i]))
            return
        going = [i for i, (job, pick) in enumerate(zip(jobs, self._pick(logits, jobs), strict=True))
                 if self._deliver(job, pick)]
        self._keep(jobs, kv, going)

    def _advance_alone(self, job: GenerationJob, kv: KvBatch | None) -> None:
        assert kv is not None
        try:
            logits = self._decode([job], kv)
        except Exception as error:
            self.fail(job, error, "a decode step")
            return
        if self._deliver(job, self._pick(logits, [job])[0]):
            self.batch.append(job)
            self.kv = kvs.merge(self.kv, kv)

    # -- forwards ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def _prefill(self, jobs: list[GenerationJob]) -> tuple[KvBatch, Tensor]:
        """The prompts, left-padded to one width, in one forward: their cache and last-position scores."""
        width = max(len(job.prompt) for job in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt)) + j.prompt for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self.last_only else {}
        self.route.use([job.adapter for job in jobs])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        kv = KvBatch(out.past_key_values, mask)
        columns = kvs.pairs_of(kv.cache)[0][0].shape[-2]
        if columns != width:
            raise ServeError(400, f"the adapter adds {columns - width} positions to the prompt (virtual tokens or "
                             "a key/value prefix); this server batches only adapters that keep the input's length",
                             "adapter_not_servable", "model")
        return kv, out.logits[:, -1]

    @torch.inference_mode()
    def _decode(self, jobs: list[GenerationJob], kv: KvBatch) -> Tensor:
        """Each row's last token through the model on top of the batch cache; ``kv`` grows by one column."""
        ids = torch.tensor([[job.output[-1]] for job in jobs], device=self.device)
        mask = torch.cat([kv.mask, kv.mask.new_ones(kv.rows, 1)], dim=1)
        positions = kv.lengths().unsqueeze(1)
        adapters = [job.adapter for job in jobs]
        self.stats.record(adapters)
        self.route.use(adapters)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=kv.cache,
                         use_cache=True)
        kv.cache, kv.mask = out.past_key_values, mask
        return out.logits[:, -1]

    # -- tokens to requests -----------------------------------------------------------------------

    def _pick(self, logits: Tensor, jobs: list[GenerationJob]) -> list[Pick]:
        """Every row's next token; a row whose scores are broken, or whose sampling fails, gets the error."""
        broken = broken_rows(logits)
        greedy: list[int] = logits.argmax(dim=-1).tolist()
        picks: list[Pick] = []
        for row, job in enumerate(jobs):
            if broken[row]:
                picks.append(NonFiniteScores("the model's scores for this request are NaN (a broken adapter?)"))
                continue
            try:
                picks.append(choose(logits[row], greedy[row], job.sampling, job.generator))
            except Exception as error:
                picks.append(error)
        return picks

    def _deliver(self, job: GenerationJob, pick: Pick) -> bool:
        """Give the request its token; whether it goes on to another step."""
        if isinstance(pick, BaseException):
            self.fail(job, pick, "sampling")
            return False
        if job.cancelled:
            return False
        job.output.append(pick)
        if pick in self.eos and not job.sampling.ignore_eos:
            return self._finish(job, "stop")
        piece = job.text.add(pick)
        if piece:
            job.sink(Delta(piece))
        if job.text.stopped:
            return self._finish(job, "stop")
        if len(job.output) >= job.sampling.max_tokens:
            return self._finish(job, "length")
        return True

    @staticmethod
    def _finish(job: GenerationJob, reason: str) -> bool:
        rest = job.text.flush()
        if rest:
            job.sink(Delta(rest))
        job.sink(Done(job.text.text, reason, len(job.prompt), len(job.output)))
        return False

    def check_adapter(self, internal: str) -> None:
        """A one-token prompt through the new adapter: it must route, and keep the input's length."""
        probe = GenerationJob([self.pad_id], Sampling(max_tokens=1), TextStream(self.tokenizer), lambda event: None,
                              internal)
        try:
            self._prefill([probe])
        finally:
            self.release()
