"""Token ids to text as they come: incremental decoding, stop strings, and text held back for safety.

The whole output is decoded again at each step (tokenizers merge bytes and spaces across tokens, so
token-by-token decoding is wrong for many of them); what is released is the part no later token can
change: never a trailing replacement character (an unfinished UTF-8 sequence) nor the start of a
stop string that the next tokens might complete.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class TextStream:
    """The text of one request's output so far, and how much of it the client already has."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one more output token (not end-of-sequence); return the text now safe to send."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        return self._release(self._safe_end())

    def flush(self) -> str:
        """The rest of the text (at the end of the request)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _stop_at(self) -> int | None:
        """Where the first stop string begins, if one has appeared (searched only where it could be new)."""
        found = None
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0 and (found is None or at < found):
                found = at
        return found

    def _safe_end(self) -> int:
        """How far the text cannot change: before an unfinished character and a possible stop's start."""
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == INCOMPLETE:
            end -= 1
        held = max((_overlap(self.text[:end], stop) for stop in self.stops), default=0)
        return end - held


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
