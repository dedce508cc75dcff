"""OpenAI's response and stream-chunk shapes (``text_completion``, ``chat.completion``, ``...chunk``)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .events import Done

DONE_LINE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def total_usage(results: list[Done]) -> dict[str, int]:
    return usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))


@dataclass
class Reply:
    """The fields every response and chunk of one request shares."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, results: list[Done]) -> dict[str, Any]:
        """The non-streaming body: one choice per prompt, and the usage of all."""
        return {**self._head(False), "choices": [self._choice(i, r) for i, r in enumerate(results)],
                "usage": total_usage(results)}

    def _choice(self, index: int, result: Done) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                    "finish_reason": result.finish_reason}
        return {"index": index, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        """A stream chunk: new text of choice ``index`` (chat: as a delta; ``role`` opens the message)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, results: list[Done]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage of all."""
        return {**self._head(True), "choices": [], "usage": total_usage(results)}
