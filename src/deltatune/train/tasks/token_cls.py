"""Token classification (named entities, BIO tags): one tag per word; metric entity-level F1.

A row holds ``tokens`` (the words) and ``tags`` (one per word, e.g. ``B-PER``, ``I-PER``, ``O``).
The tokenizer may split a word into several sub-tokens; the word's tag is the label of its
first sub-token and the others are -100 (not trained, not scored), as is usual for BERT-style
taggers. The tag set is learned from the training rows; a tag seen only in evaluation data is
an error. Entity F1 compares exact (start, end, type) spans, conlleval style; words cut off by
``max_length`` count as predicted ``O``, so truncation costs recall instead of being hidden.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import DataError
from ..data import Row, Rows
from ..labels import LabelledTask, LabelSet
from ..metrics import accuracy, entity_scores
from .base import Batch, Features, Task, batches
from .common import IGNORE, aligned, by_length, device_of, mask, pad, require_fast, require_inputs, to_device, words

class TokenClassification(LabelledTask, Task):
    """Words -> one tag each, with a linear head on the encoder's token outputs."""

    name = "token-cls"
    task_type = "TOKEN_CLS"
    metric = "entity_f1"
    columns = {"tokens": "tokens", "tags": "tags"}


    def __init__(self, tokenizer: Any, max_length: int = 128, column_map: Mapping[str, str] | None = None,
                 state: Mapping[str, Any] | None = None) -> None:
        super().__init__(tokenizer, max_length, column_map, state)
        require_fast(tokenizer, self.name, "it maps sub-tokens back to words")

    def fit(self, rows: Rows) -> None:
        column = self.column("tags")
        cells = ((t, rows.where(i)) for i, r in enumerate(rows.rows) for t in words(r[column], column, rows.where(i)))
        self.labels = LabelSet.learn(cells, rows.source)

    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        return self.labelled_model("AutoModelForTokenClassification", model_path, dtype)

    def saved_modules(self, model: nn.Module) -> list[str]:
        """The new tag head (``classifier`` in BERT-like models, ``score`` in some decoders)."""
        return [name for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module)]

    def _words(self, rows: Rows) -> list[list[str]]:
        column = self.column("tokens")
        return [words(r[column], column, rows.where(i)) for i, r in enumerate(rows.rows)]

    def _features(self, sentences: list[list[str]]) -> list[Features]:
        """Token ids and, per word that survived truncation, the position of its first sub-token."""
        encoded = self.tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=self.max_length)
        features = []
        for i in range(len(sentences)):
            first: dict[int, int] = {}
            for position, word in enumerate(encoded.word_ids(i)):
                if word is not None and word not in first:
                    first[word] = position
            features.append({"input_ids": encoded["input_ids"][i], "first": first, "words": len(sentences[i])})
        return features

    def encode(self, rows: Rows) -> list[Features]:
        sentences = self._words(rows)
        features = self._features(sentences)
        column = self.column("tags")
        for index, (row, feature) in enumerate(zip(rows.rows, features, strict=True)):
            where = rows.where(index)
            tags = [self.labels.id(t, where) for t in words(row[column], column, where)]
            if len(tags) != feature["words"]:
                raise DataError(f"{where}: {feature['words']} tokens but {len(tags)} tags; give every token one tag")
            labels = [IGNORE] * len(feature["input_ids"])
            for word, position in feature["first"].items():
                labels[position] = tags[word]
            feature.update(labels=labels, tags=tags)
        return features

    def collate(self, features: Sequence[Features]) -> Batch:
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, self.tokenizer.pad_token_id or 0), "attention_mask": mask(ids)}
        if features and "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE)
        return batch

    @torch.inference_mode()
    def _predicted_tags(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[list[int]]:
        """Per word: the argmax tag at its first sub-token; ``O`` (or tag 0) for words truncated away."""
        outside = self.labels.ids.get("O", 0)
        predicted: list[list[int]] = [[] for _ in features]
        for chunk in batches(by_length(features), batch_size):
            batch = to_device(self.collate([{"input_ids": features[i]["input_ids"]} for i in chunk]), device_of(model))
            best = aligned(model(**batch).logits, batch["input_ids"].shape[1]).argmax(dim=-1).tolist()
            for row, i in zip(best, chunk, strict=True):
                first = features[i]["first"]
                predicted[i] = [row[first[w]] if w in first else outside for w in range(features[i]["words"])]
        return predicted

    def outputs(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[Any]:
        return self._predicted_tags(model, features, batch_size)

    def score(self, features: Sequence[Features], outputs: Sequence[Any]) -> dict[str, float]:
        predicted, gold = list(outputs), [f["tags"] for f in features]
        names = self.labels.names
        scores = entity_scores([[names[t] for t in p] for p in predicted], [[names[t] for t in g] for g in gold])
        flat_p, flat_g = [t for p in predicted for t in p], [t for g in gold for t in g]
        return {"entity_f1": scores["f1"], "entity_precision": scores["precision"],
                "entity_recall": scores["recall"], "token_accuracy": accuracy(flat_p, flat_g)}

    def predict(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[Any]:
        """One tag name per word of each row's ``tokens``."""
        require_inputs(rows, [self.column("tokens")])
        features = self._features(self._words(Rows(list(rows), "input")))
        return [[self.labels.names[t] for t in tags] for tags in self._predicted_tags(model, features, batch_size)]
