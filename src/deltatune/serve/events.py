"""What the worker thread tells a waiting request, through the request's sink (thread-safe)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ServeError


@dataclass(frozen=True)
class Delta:
    """New text of a generation, safe to send (see ``text.TextStream``)."""

    text: str


@dataclass(frozen=True)
class Done:
    """A generation ended: its whole text, why it ended ("stop" or "length") and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Classified:
    """Per input text: the label id, its name and every label's probability; and the input tokens."""

    results: list[tuple[int, str, list[float]]]
    prompt_tokens: int


@dataclass(frozen=True)
class Failed:
    error: ServeError


Event = Delta | Done | Classified | Failed
Sink = Callable[[Event], Any]
"""Called from the worker thread; it hands the event over to the request's event loop."""
