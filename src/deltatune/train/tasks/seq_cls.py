"""Sequence classification: one label per text (or text pair); metrics accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import Row, Rows
from ..labels import LabelledTask, LabelSet
from ..metrics import accuracy, macro_f1
from .base import Batch, Features, Task, batches
from .common import device_of, ensure_pad_token, text, to_device


class SequenceClassification(LabelledTask, Task):
    """Text (and optional second text) -> one of the labels seen in training."""

    name = "seq-cls"
    task_type = "SEQ_CLS"
    metric = "accuracy"
    columns = {"text": "text", "label": "label"}
    optional_columns = {"text_pair": "text_pair"}

    def __init__(self, tokenizer: Any, max_length: int = 128, column_map: Mapping[str, str] | None = None,
                 state: Mapping[str, Any] | None = None) -> None:
        super().__init__(tokenizer, max_length, column_map, state)
        ensure_pad_token(tokenizer, self.name)

    def fit(self, rows: Rows) -> None:
        column = self.column("label")
        self.labels = LabelSet.learn(((r[column], rows.where(i)) for i, r in enumerate(rows.rows)), rows.source)

    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        """The model with a head for the labels. A decoder's head classifies from the last token that is
        not padding, which it finds by the config's pad token id: most decoder checkpoints leave it
        unset (transformers then refuses batches of more than one row), so it is the tokenizer's."""
        model = self.labelled_model("AutoModelForSequenceClassification", model_path, dtype)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def saved_modules(self, model: nn.Module) -> list[str]:
        """BERT-style models classify from a pooler (dense + tanh on [CLS]) that some checkpoints never
        trained (all-MiniLM-L6-v2's is near its initialisation); train it with the head (d*d + d weights)."""
        return [name for name, _ in model.named_modules() if name.split(".")[-1] == "pooler"][:1]

    def _tokenize(self, rows: Rows) -> dict[str, list[list[int]]]:
        """Token ids of the texts (and text pairs); a cell that is not text (null, a number) is an error,
        not the string "None" or "3"."""
        column, pair_column = self.column("text"), self.column("text_pair")
        texts = [text(r[column], column, rows.where(i)) for i, r in enumerate(rows.rows)]
        pairs = None
        if rows.rows and pair_column in rows.rows[0]:
            pairs = [text(r.get(pair_column), pair_column, rows.where(i)) for i, r in enumerate(rows.rows)]
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        return dict(encoded)

    def encode(self, rows: Rows) -> list[Features]:
        encoded = self._tokenize(rows)
        label_column = self.column("label")
        features = []
        for i, row in enumerate(rows.rows):
            feature: Features = {key: values[i] for key, values in encoded.items()}
            feature["labels"] = self.labels.id(row[label_column], rows.where(i))
            features.append(feature)
        return features

    def collate(self, features: Sequence[Features]) -> Batch:
        return dict(self.tokenizer.pad(list(features), return_tensors="pt"))

    @torch.inference_mode()
    def _logits(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> torch.Tensor:
        """The head's logits for ``features`` (rows in their order), computed in batches of similar length."""
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        logits = torch.empty(len(features), len(self.labels))
        for chunk in batches(order, batch_size):
            batch = self.collate([{k: v for k, v in features[i].items() if k != "labels"} for i in chunk])
            logits[chunk] = model(**to_device(batch, device_of(model))).logits.float().cpu()
        return logits

    def _predicted_ids(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[int]:
        ids: list[int] = self._logits(model, features, batch_size).argmax(dim=-1).tolist()
        return ids

    def probabilities(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[dict[str, float]]:
        """Each row's probability of every label (softmax of the head's logits), labels in training order."""
        probs = self._logits(model, self._features(rows), batch_size).softmax(dim=-1).tolist()
        return [dict(zip(self.labels.names, row, strict=True)) for row in probs]

    def _features(self, rows: Sequence[Row]) -> list[Features]:
        encoded = self._tokenize(Rows(list(rows), "input"))
        return [{key: values[i] for key, values in encoded.items()} for i in range(len(rows))]

    def outputs(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[Any]:
        return self._predicted_ids(model, features, batch_size)

    def score(self, features: Sequence[Features], outputs: Sequence[Any]) -> dict[str, float]:
        predicted, gold = list(outputs), [f["labels"] for f in features]
        return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold)}

    def predict(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[Any]:
        return [self.labels.names[i] for i in self._predicted_ids(model, self._features(rows), batch_size)]
