"""Extractive QA helpers: read the answers of a row, map character spans to tokens and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import DataError

Offsets = list[tuple[int, int] | None]
"""Per token: its (start, end) characters in the context, or None for question and special tokens."""


@dataclass(frozen=True)
class Answers:
    """The gold answers of one row; empty when the question has no answer in the context."""

    texts: list[str]
    starts: list[int]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_answers(value: Any, start: Any, context: str, where: str) -> Answers:
    """Answers in any of the accepted shapes, checked against the context.

    Shapes: SQuAD's ``{"text": [...], "answer_start": [...]}``; a list of ``{"text", "answer_start"}``
    objects; or plain text (or a list of texts) with the start in the ``answer_start`` column, or,
    without a start, at the text's first occurrence in the context.
    """
    if isinstance(value, dict) and "text" in value:
        texts, starts = _as_list(value["text"]), _as_list(value.get("answer_start", []))
    elif isinstance(value, list) and all(isinstance(v, dict) and "text" in v for v in value):
        texts, starts = [v["text"] for v in value], [v.get("answer_start") for v in value]
    elif isinstance(value, (str, list)):
        texts, starts = _as_list(value), _as_list(start) if start is not None else []
    else:
        raise DataError(f"{where}: answers must be {{\"text\": [...], \"answer_start\": [...]}}, a list of such "
                        f"objects, or the answer text; found {value!r:.100}")
    starts = starts or [None] * len(texts)
    if len(starts) != len(texts) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}: {len(texts)} answer texts but {len(starts)} answer starts; give one start per text")
    kept = [(t, s) for t, s in zip(texts, starts, strict=True) if t]  # an empty text means "no answer"
    return Answers([t for t, _ in kept], [_checked_start(t, s, context, where) for t, s in kept])


def _checked_start(answer: str, start: Any, context: str, where: str) -> int:
    if start is None or start == "":
        found = context.find(answer)
        if found < 0:
            raise DataError(f"{where}: the answer {answer!r:.60} does not occur in the context")
        return found
    try:
        position = int(start)
    except (TypeError, ValueError):
        raise DataError(f"{where}: answer_start must be a character position, found {start!r}") from None
    if context[position:position + len(answer)] != answer:
        raise DataError(f"{where}: the context at answer_start {position} reads "
                        f"{context[position:position + len(answer)]!r:.60}, not the answer {answer!r:.60}; "
                        "fix answer_start (a 0-based character position) or leave it out to search for the text")
    return position


def token_span(offsets: Offsets, start_char: int, end_char: int) -> tuple[int, int]:
    """First and last token of the characters [start_char, end_char) of the context.

    (0, 0) -- the first ([CLS]) token -- when the answer is not entirely inside the context
    tokens that survived truncation, as Hugging Face's QA examples do.
    """
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:  # type: ignore[index]
        return 0, 0
    start = max(i for i in inside if offsets[i][0] <= start_char)  # type: ignore[index]
    end = min(i for i in inside if offsets[i][1] >= end_char)  # type: ignore[index]
    return start, max(start, end)


def best_span(start_logits: Tensor, end_logits: Tensor, offsets: Offsets, max_tokens: int) -> tuple[int, int, float]:
    """The context span (first token, last token, score) with the highest start + end logit.

    Only spans inside the context, with start <= end and at most ``max_tokens`` tokens, are
    allowed. Returns (0, 0, -inf) when no context token is left.
    """
    n = len(offsets)
    valid = torch.tensor([o is not None for o in offsets], device=start_logits.device)
    scores = start_logits[:n, None].float() + end_logits[None, :n].float()
    i, j = torch.arange(n, device=scores.device)[:, None], torch.arange(n, device=scores.device)[None, :]
    allowed = valid[:, None] & valid[None, :] & (j >= i) & (j - i < max_tokens)
    scores = scores.masked_fill(~allowed, float("-inf"))
    best = int(scores.argmax())
    score = float(scores.flatten()[best])
    return (best // n, best % n, score) if score > float("-inf") else (0, 0, score)


def span_text(context: str, offsets: Offsets, start: int, end: int) -> str:
    first, last = offsets[start], offsets[end]
    return context[first[0]:last[1]] if first is not None and last is not None else ""


def context_offsets(offsets: Sequence[Sequence[int]], sequence_ids: Sequence[int | None]) -> Offsets:
    """Offsets of the context tokens (sequence 1); None elsewhere, so spans never enter the question."""
    return [(int(o[0]), int(o[1])) if s == 1 else None for o, s in zip(offsets, sequence_ids, strict=True)]
