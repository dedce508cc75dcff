"""Extractive question answering (SQuAD): find the answer span in the context.

The question and context are tokenized as a pair, the context truncated to ``max_length``
(``only_second``; long contexts are cut, not split into windows). The answer's character span
becomes start/end token positions through the fast tokenizer's offsets; an answer cut off by
truncation, or a question without an answer (SQuAD 2.0's empty ``text`` list), points at the
first ([CLS]) token. The head is a linear layer giving a start and an end logit per token.

Evaluation decodes the best span (start <= end, at most ``max_answer_tokens`` tokens, inside
the context) and scores it against every gold answer with SQuAD's exact match and F1 (best
gold counts), after SQuAD's normalisation. When the training data has unanswerable questions,
"no answer" is predicted where the [CLS] score beats the best span.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ... import hf
from ..data import Row, Rows
from ..metrics import squad_exact, squad_f1
from .base import Batch, Features, Task, batches
from .common import aligned, by_length, device_of, mask, pad, require_fast, require_inputs, text, to_device
from .qa_spans import Answers, Offsets, best_span, context_offsets, read_answers, span_text, token_span


class QuestionAnswering(Task):
    """(question, context) -> the answer's span in the context."""

    name = "qa"
    task_type = "QUESTION_ANS"
    metric = "f1"
    columns = {"question": "question", "context": "context", "answers": "answers"}
    optional_columns = {"answer_start": "answer_start"}

    unanswerable: bool = False
    """Whether training had questions without an answer (then "no answer" can be predicted)."""

    def __init__(self, tokenizer: Any, max_length: int = 384, column_map: Mapping[str, str] | None = None,
                 state: Mapping[str, Any] | None = None, max_answer_tokens: int = 30) -> None:
        super().__init__(tokenizer, max_length, column_map, state)
        self.max_answer_tokens = max_answer_tokens
        require_fast(tokenizer, self.name, "it maps answer characters to tokens")

    def fit(self, rows: Rows) -> None:
        self.unanswerable = any(not a.texts for a in self._answers(rows))

    def state(self) -> dict[str, Any]:
        return {"unanswerable": self.unanswerable}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.unanswerable = bool(state.get("unanswerable", False))

    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        model: nn.Module = hf.from_pretrained("AutoModelForQuestionAnswering", model_path, dtype=dtype)
        return model

    def saved_modules(self, model: nn.Module) -> list[str]:
        """The new span head (``qa_outputs`` in transformers' QA models)."""
        return ["qa_outputs"] if isinstance(getattr(model, "qa_outputs", None), nn.Module) else []

    def _answers(self, rows: Rows) -> list[Answers]:
        answers, context, start = self.column("answers"), self.column("context"), self.column("answer_start")
        return [read_answers(r[answers], r.get(start), text(r[context], context, rows.where(i)), rows.where(i))
                for i, r in enumerate(rows.rows)]

    def _features(self, rows: Rows) -> list[Features]:
        """Token ids of (question, context) pairs with the context offsets needed to read spans back."""
        q, c = self.column("question"), self.column("context")
        questions = [text(r[q], q, rows.where(i)) for i, r in enumerate(rows.rows)]
        contexts = [text(r[c], c, rows.where(i)) for i, r in enumerate(rows.rows)]
        encoded = self.tokenizer(questions, contexts, truncation="only_second", max_length=self.max_length,
                                 return_offsets_mapping=True)
        features: list[Features] = [{"input_ids": encoded["input_ids"][i], "context": contexts[i],
                                     "offsets": context_offsets(encoded["offset_mapping"][i], encoded.sequence_ids(i))}
                                    for i in range(len(rows.rows))]
        if "token_type_ids" in encoded:  # BERT-style models tell question from context by segment
            for feature, types in zip(features, encoded["token_type_ids"], strict=True):
                feature["token_type_ids"] = types
        return features

    def encode(self, rows: Rows) -> list[Features]:
        features = self._features(rows)
        for feature, answers in zip(features, self._answers(rows), strict=True):
            # train on the first gold answer; score against all of them
            start, end = (token_span(feature["offsets"], answers.starts[0], answers.starts[0] + len(answers.texts[0]))
                          if answers.texts else (0, 0))
            feature.update(start_positions=start, end_positions=end, answers=answers.texts or [""])
        return features

    def collate(self, features: Sequence[Features]) -> Batch:
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, self.tokenizer.pad_token_id or 0), "attention_mask": mask(ids)}
        if features and "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0)
        if features and "start_positions" in features[0]:
            for key in ("start_positions", "end_positions"):
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    def _answer(self, start_logits: torch.Tensor, end_logits: torch.Tensor, feature: Features) -> str:
        offsets: Offsets = feature["offsets"]
        start, end, score = best_span(start_logits, end_logits, offsets, self.max_answer_tokens)
        if self.unanswerable and float(start_logits[0] + end_logits[0]) > score:
            return ""
        return span_text(feature["context"], offsets, start, end)

    @torch.inference_mode()
    def _predicted(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[str]:
        predicted = [""] * len(features)
        for chunk in batches(by_length(features), batch_size):
            inputs = [{k: v for k, v in features[i].items() if k in ("input_ids", "token_type_ids")} for i in chunk]
            batch = to_device(self.collate(inputs), device_of(model))
            output, length = model(**batch), batch["input_ids"].shape[1]
            starts, ends = aligned(output.start_logits, length), aligned(output.end_logits, length)
            for row, i in enumerate(chunk):
                predicted[i] = self._answer(starts[row], ends[row], features[i])
        return predicted

    def outputs(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[Any]:
        return self._predicted(model, features, batch_size)

    def score(self, features: Sequence[Features], outputs: Sequence[Any]) -> dict[str, float]:
        predicted = list(outputs)
        golds = [f["answers"] for f in features]
        exact = [max(squad_exact(p, g) for g in gold) for p, gold in zip(predicted, golds, strict=True)]
        f1 = [max(squad_f1(p, g) for g in gold) for p, gold in zip(predicted, golds, strict=True)]
        n = max(1, len(features))
        return {"f1": sum(f1) / n, "exact_match": sum(exact) / n}

    def predict(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[Any]:
        """The answer text for each row's question and context ("" for no answer)."""
        require_inputs(rows, [self.column("question"), self.column("context")])
        return self._predicted(model, self._features(Rows(list(rows), "input")), batch_size)
