"""Sequence-to-sequence LM (T5, BART): ``source`` text in, ``target`` text out.

The encoder reads the source; the decoder learns the target with teacher forcing (the model
builds its decoder input by shifting the labels right). Padding in the labels is -100 so it
is not scored. Evaluation reports the per-token loss (main metric ``neg_loss`` = -loss),
perplexity, and the exact-match rate of greedy generation against the target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ... import hf
from ..data import Row, Rows
from .base import Batch, Features, Task, batches
from .common import IGNORE, by_length, device_of, ensure_pad_token, generate, loss_metrics, mask, pad, \
    require_inputs, text, to_device, token_loss_rows


class Seq2SeqLM(Task):
    """Source text -> target text with an encoder-decoder model."""

    name = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"
    metric = "neg_loss"
    columns = {"source": "source", "target": "target"}

    def __init__(self, tokenizer: Any, max_length: int = 128, column_map: Mapping[str, str] | None = None,
                 state: Mapping[str, Any] | None = None, max_new_tokens: int = 64) -> None:
        super().__init__(tokenizer, max_length, column_map, state)
        self.max_new_tokens = max_new_tokens
        ensure_pad_token(tokenizer, self.name)

    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        model: nn.Module = hf.from_pretrained("AutoModelForSeq2SeqLM", model_path, dtype=dtype)
        return model

    def _sources(self, rows: Rows) -> list[list[int]]:
        column = self.column("source")
        texts = [text(r[column], column, rows.where(i)) for i, r in enumerate(rows.rows)]
        ids: list[list[int]] = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return ids

    def encode(self, rows: Rows) -> list[Features]:
        column = self.column("target")
        targets = [text(r[column], column, rows.where(i)) for i, r in enumerate(rows.rows)]
        labels = self.tokenizer(text_target=targets, truncation=True, max_length=self.max_length)["input_ids"]
        sources = self._sources(rows)
        return [{"input_ids": s, "labels": t} for s, t in zip(sources, labels, strict=True)]

    def collate(self, features: Sequence[Features]) -> Batch:
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, self.tokenizer.pad_token_id), "attention_mask": mask(ids)}
        if features and "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE)
        return batch

    def _generate(self, model: nn.Module, batch: Batch, budgets: Sequence[int]) -> list[str]:
        """Greedy decoding of a batch of sources, row i to at most ``budgets[i]`` new tokens, as text without
        special tokens. The batch decodes to its largest budget and each row is cut to its own, so a row's
        text does not depend on the rows it shares a batch with."""
        generated = generate(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max(budgets), do_sample=False)
        # the decoder starts from one token (its start token), then come the new ones
        rows = [ids[:1 + budget] for ids, budget in zip(generated.tolist(), budgets, strict=True)]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    @torch.inference_mode()
    def outputs(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[Any]:
        """Each row's (summed cross-entropy, scored tokens, exact match of its greedy generation)."""
        rows: list[Any] = [None] * len(features)
        for chunk in batches(by_length(features), batch_size):
            batch = to_device(self.collate([features[i] for i in chunk]), device_of(model))
            losses = token_loss_rows(model(**batch).logits, batch["labels"])
            # the gold is decoded too, so both sides went through the same tokenizer round trip
            gold = [self.tokenizer.decode(features[i]["labels"], skip_special_tokens=True).strip() for i in chunk]
            generated = self._generate(model, batch, [len(features[i]["labels"]) + 1 for i in chunk])
            for i, (total, count), text_, wanted in zip(chunk, losses, generated, gold, strict=True):
                rows[i] = (total, count, text_ == wanted)
        return rows

    def score(self, features: Sequence[Features], outputs: Sequence[Any]) -> dict[str, float]:
        total, count = sum(row[0] for row in outputs), sum(row[1] for row in outputs)
        return {**loss_metrics(total, count), "exact_match": sum(row[2] for row in outputs) / max(1, len(features))}

    @torch.inference_mode()
    def predict(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[Any]:
        """The greedy generation (up to ``max_new_tokens``) for each row's source."""
        require_inputs(rows, [self.column("source")])
        sources = self._sources(Rows(list(rows), "input"))
        outputs: list[str] = [""] * len(rows)
        for chunk in batches(sorted(range(len(rows)), key=lambda i: len(sources[i])), batch_size):
            batch = to_device(self.collate([{"input_ids": sources[i]} for i in chunk]), device_of(model))
            generated = self._generate(model, batch, [self.max_new_tokens] * len(chunk))
            for i, output in zip(chunk, generated, strict=True):
                outputs[i] = output
        return outputs
