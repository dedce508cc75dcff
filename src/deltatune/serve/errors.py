"""Errors a request can meet, in OpenAI's error shape.

Every failure a client can cause or see is a :class:`ServeError` carrying the HTTP status, a message
that says what was wrong and how to fix it, and a short machine-readable code; the app turns it into
``{"error": {"message", "type", "param", "code"}}`` as OpenAI's API (and vLLM) answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ServeError(Exception):
    """A request failed; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 404:
            kind = "not_found_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(message: str, code: str = "invalid_parameter", param: str | None = None) -> ServeError:
    return ServeError(400, message, code, param)


def unknown_model(name: str, known: Iterable[str]) -> ServeError:
    """404 for a ``model`` that is neither the base model nor a loaded adapter (vLLM's answer too)."""
    listed = ", ".join(repr(k) for k in known)
    return ServeError(404, f"The model {name!r} does not exist. Served here: {listed} (GET /v1/models lists them; "
                      "load an adapter with POST /v1/load_lora_adapter).", "model_not_found", "model")


def internal(what: str, error: BaseException) -> ServeError:
    """500 for a failure inside the model's work; the message keeps the cause so the client can report it."""
    return ServeError(500, f"{what} failed: {type(error).__name__}: {error}", "internal_error")


def unavailable(message: str) -> ServeError:
    return ServeError(503, message, "server_shutting_down")
