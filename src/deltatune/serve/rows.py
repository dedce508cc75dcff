"""The one place the worker chooses adapters for a batch: one adapter (or the base) per row.

Everything the worker runs goes through :func:`per_row_adapters`, so a batch mixes requests for any
adapters: ``deltatune.routing`` runs the base once for the whole batch and each adapter's work on its
own rows only. :class:`HeldRoute` keeps a route in force across decode steps while the batch's rows
stay the same, because entering a route visits every adapted layer, which costs about as much as a
decode step of a small model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from torch import nn

from ..adapters import disabled
from ..routing import routing


@contextmanager
def per_row_adapters(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, batch row ``i`` runs with adapter ``rows[i]`` (None: the base model alone)."""
    if all(name is None for name in rows):
        with disabled(model):  # also right for a model without any adapter (nothing to route)
            yield
        return
    with routing(model, list(rows)):
        yield


class HeldRoute:
    """The route of the last forward, left in force until a forward needs other rows or ``release`` is
    called (before adapters are loaded or unloaded: a route must not be open across that)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows: tuple[str | None, ...] | None = None
        self._open: ExitStack | None = None

    def use(self, rows: Sequence[str | None]) -> None:
        """Make ``rows`` the route of the next forward (nothing to do when it already is)."""
        wanted = tuple(rows)
        if wanted == self.rows:
            return
        self.release()
        stack = ExitStack()
        stack.enter_context(per_row_adapters(self.model, wanted))  # raises with nothing entered
        self._open, self.rows = stack, wanted

    def release(self) -> None:
        """Back to the model's own active adapters."""
        stack, self._open, self.rows = self._open, None, None
        if stack is not None:
            stack.close()
