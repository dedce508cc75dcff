"""Sentence embeddings: mean-pooled encoder outputs trained on sentence pairs.

An embedding is the mean of the encoder's last hidden states over the real (attention-mask)
tokens. Rows are ``sentence1`` + ``sentence2`` pairs, optionally with a similarity ``score``;
whether the training rows have scores picks the objective (and it is kept in the run):

* with scores -- CoSENT: for every two pairs i, j in a batch with score_i > score_j, the loss
  ``log(1 + sum exp(20 * (cos_j - cos_i)))`` asks cos_i > cos_j. Only the order of scores
  matters, so any scale works (0-1, 0-5, ...). Metric: Spearman correlation of cosine and score.
* without scores -- multiple negatives ranking: sentence2 of every other row in the batch is a
  negative; cross-entropy over 20 x cosine similarities. Duplicate pairs in a batch act as false
  negatives. Metric: retrieval accuracy@1 over all evaluation pairs (does sentence1 find its own
  sentence2 among all sentence2s).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ... import hf
from ...errors import DataError
from ..data import Row, Rows
from ..metrics import spearman
from .base import Batch, Features, Task, batches
from .common import aligned, device_of, mask, pad, require_inputs, text, to_device

SCALE = 20.0
"""Cosine similarities are multiplied by this before the softmax / CoSENT exponent (sharper targets)."""


def embed(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the last hidden states over the attention mask: one vector per row."""
    hidden = aligned(model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, input_ids.shape[1])
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def cosent_loss(cosines: Tensor, scores: Tensor) -> Tensor:
    """log(1 + sum over pairs with score_i > score_j of exp(SCALE * (cos_j - cos_i)))."""
    differences = SCALE * (cosines[None, :] - cosines[:, None])  # [i, j] = SCALE * (cos_j - cos_i)
    ordered = scores[:, None] > scores[None, :]
    terms = torch.cat([differences.new_zeros(1), differences[ordered]])  # the 0 is the "1 +"
    return torch.logsumexp(terms, dim=0)


def ranking_loss(first: Tensor, second: Tensor) -> Tensor:
    """Cross-entropy of each sentence1 picking its own sentence2 among all sentence2s of the batch."""
    similarities = SCALE * nn.functional.normalize(first, dim=-1) @ nn.functional.normalize(second, dim=-1).T
    return nn.functional.cross_entropy(similarities, torch.arange(len(first), device=first.device))


class FeatureExtraction(Task):
    """Sentence pairs -> an encoder whose mean-pooled outputs are similar for similar sentences."""

    name = "feature-extraction"
    task_type = "FEATURE_EXTRACTION"
    metric = "accuracy_at_1"
    columns = {"sentence1": "sentence1", "sentence2": "sentence2"}
    optional_columns = {"score": "score", "text": "text"}

    scored: bool = False

    def fit(self, rows: Rows) -> None:
        self.load_state({"scored": any(row.get(self.column("score")) is not None for row in rows.rows)})

    def state(self) -> dict[str, Any]:
        return {"scored": self.scored}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.scored = bool(state.get("scored", False))
        # the main metric follows the objective, so evaluation and early stopping use the right one
        self.metric = "spearman" if self.scored else "accuracy_at_1"

    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        model: nn.Module = hf.from_pretrained("AutoModel", model_path, dtype=dtype)
        return model

    def _ids(self, rows: Rows, role: str) -> list[list[int]]:
        column = self.column(role)
        texts = [text(r[column], column, rows.where(i)) for i, r in enumerate(rows.rows)]
        ids: list[list[int]] = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return ids

    def _score(self, row: Row, where: str) -> float:
        column = self.column("score")
        if row.get(column) is None:
            raise DataError(f"{where}: no {column!r} value, but the training rows have scores; give every row "
                            "a score, or train without them (the contrastive objective)")
        try:
            return float(row[column])
        except (TypeError, ValueError):
            raise DataError(f"{where}: {column!r} must be a number, found {row[column]!r}") from None

    def encode(self, rows: Rows) -> list[Features]:
        first, second = self._ids(rows, "sentence1"), self._ids(rows, "sentence2")
        features: list[Features] = [{"input_ids": a, "input_ids_2": b} for a, b in zip(first, second, strict=True)]
        if self.scored:
            for index, (row, feature) in enumerate(zip(rows.rows, features, strict=True)):
                feature["score"] = self._score(row, rows.where(index))
        return features

    def collate(self, features: Sequence[Features]) -> Batch:
        batch: Batch = {}
        for suffix in ("", "_2"):
            if features and f"input_ids{suffix}" in features[0]:
                ids = [f[f"input_ids{suffix}"] for f in features]
                batch[f"input_ids{suffix}"] = pad(ids, self.tokenizer.pad_token_id or 0)
                batch[f"attention_mask{suffix}"] = mask(ids)
        if features and "score" in features[0]:
            batch["score"] = torch.tensor([f["score"] for f in features], dtype=torch.float)
        return batch

    def _pair(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        return (embed(model, batch["input_ids"], batch["attention_mask"]),
                embed(model, batch["input_ids_2"], batch["attention_mask_2"]))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        first, second = self._pair(model, batch)
        if self.scored:
            return cosent_loss(nn.functional.cosine_similarity(first, second, dim=-1), batch["score"])
        return ranking_loss(first, second)

    @torch.inference_mode()
    def _embeddings(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> tuple[Tensor, Tensor]:
        pairs = [self._pair(model, to_device(self.collate(chunk), device_of(model)))
                 for chunk in batches(features, batch_size)]
        return torch.cat([p[0] for p in pairs]).float(), torch.cat([p[1] for p in pairs]).float()

    def outputs(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[Any]:
        """Each pair's two embeddings (CPU): retrieval ranks every first sentence against every second one."""
        first, second = self._embeddings(model, features, batch_size)
        return list(zip(first.cpu(), second.cpu(), strict=True))

    def score(self, features: Sequence[Features], outputs: Sequence[Any]) -> dict[str, float]:
        first = torch.stack([pair[0] for pair in outputs]) if outputs else torch.empty(0, 0)
        second = torch.stack([pair[1] for pair in outputs]) if outputs else torch.empty(0, 0)
        first, second = nn.functional.normalize(first, dim=-1), nn.functional.normalize(second, dim=-1)
        cosines = (first * second).sum(-1)
        metrics = {"pair_cosine": float(cosines.mean())}
        if self.scored:
            return {"spearman": spearman(cosines.tolist(), [f["score"] for f in features]), **metrics}
        hits = (first @ second.T).argmax(dim=1) == torch.arange(len(first), device=first.device)
        return {"accuracy_at_1": float(hits.float().mean()), **metrics}

    @torch.inference_mode()
    def predict(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[Any]:
        """The embedding (a list of floats) of each row's ``sentence1``, or of its ``text``."""
        role = "sentence1" if rows and self.column("sentence1") in rows[0] else "text"
        require_inputs(rows, [self.column(role)])
        ids = self._ids(Rows(list(rows), "input"), role)
        vectors = [embed(model, **to_device(self.collate([{"input_ids": i} for i in chunk]), device_of(model)))
                   for chunk in batches(ids, batch_size)]
        return torch.cat(vectors).float().tolist() if vectors else []
