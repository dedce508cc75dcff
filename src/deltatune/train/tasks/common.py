"""Helpers the task types share: padding, devices, token losses and row checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import DataError
from ..data import Row, Rows, require_columns
from .base import Batch, Features

IGNORE = -100
"""The label value cross-entropy skips (prompt tokens, padding, sub-tokens after the first)."""


def pad(sequences: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    """Integer lists as one (batch, longest) tensor; ``left`` pads in front (for generation)."""
    longest = max((len(s) for s in sequences), default=0)
    rows = [[value] * (longest - len(s)) + list(s) if left else list(s) + [value] * (longest - len(s))
            for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def mask(sequences: Sequence[Sequence[int]], left: bool = False) -> Tensor:
    """The attention mask that goes with :func:`pad`."""
    return pad([[1] * len(s) for s in sequences], 0, left)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


def aligned(per_position: Tensor, length: int) -> Tensor:
    """Per-position outputs for the input's ``length`` positions: an adapter that puts virtual tokens
    before the input makes the model return that many more, in front."""
    return per_position[:, per_position.shape[1] - length:]


def token_loss_rows(logits: Tensor, labels: Tensor) -> list[tuple[float, int]]:
    """Per row: (summed cross-entropy, number of scored tokens) over labels that are not :data:`IGNORE`.

    Evaluation sums over all tokens and divides once at the end, so a batch of short answers
    does not weigh as much as a batch of long ones; kept per row, the sums of a set split across
    processes add up to those of the whole set.
    """
    losses = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                         reduction="none").view(labels.shape)
    return list(zip(losses.sum(1).tolist(), (labels != IGNORE).sum(1).tolist(), strict=True))


def loss_metrics(total: float, count: int) -> dict[str, float]:
    """``neg_loss`` (the main metric: higher is better), ``loss`` and ``perplexity`` per scored token."""
    loss = total / count if count else math.nan
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return {"neg_loss": -loss, "loss": loss, "perplexity": perplexity}


def by_length(features: Sequence[Features], key: str = "input_ids") -> list[int]:
    """Feature indices, shortest first, so evaluation batches carry little padding."""
    return sorted(range(len(features)), key=lambda i: len(features[i][key]))


def ensure_pad_token(tokenizer: Any, task: str) -> None:
    """Use the end-of-sequence token for padding when the tokenizer has no pad token (LLaMA, GPT-2).

    Padding positions are masked out of attention and loss, so which id fills them is free.
    """
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token_id is None:
        raise DataError(f"task {task}: the tokenizer has neither a pad nor an end-of-sequence token; "
                        "give it one (tokenizer.pad_token = '...') and save it with the model")
    tokenizer.pad_token = tokenizer.eos_token


def text(value: Any, column: str, where: str) -> str:
    """A text cell, which must be a string."""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must hold text, found {type(value).__name__} {value!r:.60}")
    return value


def words(value: Any, column: str, where: str) -> list[str]:
    """A list of words: a JSON list of strings, or (CSV-friendly) one string split at whitespace."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{where}: column {column!r} must be a list of strings (or one space-separated string), "
                    f"found {value!r:.80}")


def require_fast(tokenizer: Any, task: str, why: str) -> None:
    """Fail unless the tokenizer is a fast (Rust) one, which reports word ids and character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"task {task} needs a fast tokenizer ({why}); {type(tokenizer).__name__} is not one. "
                        "Save the model folder with a tokenizer.json (tokenizer.save_pretrained of a fast tokenizer)")


def require_inputs(rows: Sequence[Row], columns: Sequence[str]) -> None:
    """Rows given for prediction must have the input columns (named, with the columns found)."""
    require_columns(Rows(list(rows), "input"), columns)


def generate(model: nn.Module, **kwargs: Any) -> Tensor:
    """transformers' ``generate`` (an ``nn.Module`` does not declare it), token ids out."""
    method = getattr(model, "generate", None)
    if not callable(method):
        raise DataError(f"{type(model).__name__} has no generate(); load a transformers generation model")
    if _sharded(model):  # each rank decodes its own rows: every rank must take every step (FSDP's gathers)
        kwargs.setdefault("synced_gpus", True)
    ids: Tensor = method(**kwargs)
    return ids


def _sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded across processes (FSDP2), so each forward is a collective."""
    from torch.distributed.fsdp import FSDPModule  # only under torch.distributed; import when asked

    return isinstance(model, FSDPModule) and torch.distributed.is_initialized()
