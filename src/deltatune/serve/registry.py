"""Which names a request may give as ``model``: the base model's, and one per loaded adapter.

Served names are what clients see (any text); each adapter lives on the model under an internal name
of deltatune's own (``served_0``, ...), so a served name never has to be a valid module-safe adapter
name and a name can be reused after an unload. An adapter being unloaded is gone for new requests at
once, while the requests already admitted with it finish. Not thread-safe on its own: the worker
guards it with its lock.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ServeError, bad_request, unknown_model

State = Literal["loading", "ready", "unloading"]


@dataclass
class Adapter:
    served: str
    internal: str
    path: str
    state: State = "ready"
    created: int = field(default_factory=lambda: int(time.time()))


class AdapterTable:
    """The served names of one base model and its adapters."""

    def __init__(self, base_name: str, base_path: str) -> None:
        self.base_name, self.base_path = base_name, base_path
        self.created = int(time.time())
        self.adapters: dict[str, Adapter] = {}
        self._numbers = itertools.count()

    def reserve(self, served: str, path: str) -> Adapter:
        """A new entry, ``loading`` (not yet usable), under a fresh internal name; refuses a taken name."""
        if served == self.base_name:
            raise bad_request(f"{served!r} is the base model's name; pick another name for the adapter", "name_taken",
                              "lora_name")
        if served in self.adapters:
            raise bad_request(f"an adapter named {served!r} is already loaded ({self.adapters[served].path}); "
                              "unload it first or pick another name", "name_taken", "lora_name")
        entry = Adapter(served, f"served_{next(self._numbers)}", path, "loading")
        self.adapters[served] = entry
        return entry

    def adopt(self, served: str, internal: str, path: str) -> Adapter:
        """An adapter already on the model under ``internal`` (a run folder's own), served as ``served``."""
        entry = self.reserve(served, path)
        entry.internal, entry.state = internal, "ready"
        return entry

    def resolve(self, served: str) -> str | None:
        """The internal adapter name a request's ``model`` selects (None: the base model); 404 otherwise."""
        if served == self.base_name:
            return None
        entry = self.adapters.get(served)
        if entry is None or entry.state != "ready":
            raise unknown_model(served, self.names())
        return entry.internal

    def names(self) -> list[str]:
        return [self.base_name, *(n for n, e in self.adapters.items() if e.state == "ready")]

    def start_unload(self, served: str) -> Adapter:
        if served == self.base_name:
            raise bad_request(f"{served!r} is the base model; only adapters can be unloaded", "invalid_parameter",
                              "lora_name")
        entry = self.adapters.get(served)
        if entry is None or entry.state != "ready":
            raise ServeError(404, f"no adapter named {served!r} is loaded; loaded: {self.names()[1:]}",
                             "adapter_not_found", "lora_name")
        entry.state = "unloading"
        return entry

    def drop(self, served: str) -> None:
        self.adapters.pop(served, None)

    def listing(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` entries: the base, then each adapter with the base as its parent (as vLLM lists LoRA)."""
        base = {"id": self.base_name, "object": "model", "created": self.created, "owned_by": "deltatune",
                "root": self.base_path, "parent": None}
        return [base, *({"id": e.served, "object": "model", "created": e.created, "owned_by": "deltatune",
                         "root": e.path, "parent": self.base_name}
                        for e in self.adapters.values() if e.state == "ready")]
