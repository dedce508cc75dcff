"""The active set as data: which adapters run, and how their changes combine.

A composition is a small frozen value built from adapter names:

- ``Sum("a", "b")``: every member's change is computed from the same input and base output and
  the changes are added (what ``dt.set_active(model, ["a", "b"])`` means). Order never matters.
- ``Stack("a", "b")``: ``b`` reads ``a``'s output (activation adapters: AdapterHub's Stack).
- ``Parallel("a", "b")``: the batch is repeated, one copy per member, outputs concatenated along
  the batch (AdapterHub's Parallel); only at the top of the active set.
- ``BatchSplit("a", "b", sizes=[2, 2])``: each member adapts its own slice of rows.
- ``Average("a", "b", weights=[0.3, 0.7])``: a weighted average of the members' outputs.
- ``Fuse("a", "b")``: AdapterFusion, attention over the members' outputs.
- ``Route(["a", "b", None, "a"])``: a different adapter per batch row (None: the base); each
  adapter's work runs on its rows only (``dt.routing``, peft's ``adapter_names=``).

The model keeps one ``Active`` holder; every wrapper holds that same object, so switching is
one assignment, never a copy into each layer. What a composition means at one site is decided by
the site (a layer wrapper, a module-output site), which refuses what it cannot compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import AdapterError
from .values import is_int


@dataclass(frozen=True, init=False)
class Composition:
    """Adapter names (or nested compositions) combined in one way; see the module docstring."""

    members: tuple[str | Composition, ...]

    def __init__(self, *members: str | Composition) -> None:
        if not members:
            raise AdapterError(f"{type(self).__name__}() needs at least one adapter name, e.g. {type(self).__name__}('a', 'b')")
        for member in members:
            if not isinstance(member, (str, Composition)):
                raise AdapterError(
                    f"{type(self).__name__} members are adapter names or compositions, got {member!r} "
                    f"({type(member).__name__}); e.g. {type(self).__name__}('a', 'b')"
                )
        object.__setattr__(self, "members", tuple(members))

    def names(self) -> tuple[str, ...]:
        """Every adapter name in the composition, depth first, each once."""
        out: list[str] = []
        for member in self.members:
            for name in (member,) if isinstance(member, str) else member.names():
                if name not in out:
                    out.append(name)
        return tuple(out)

    def contains(self, part: Composition) -> bool:
        """Whether ``part`` is this composition or one nested in it."""
        return self == part or any(isinstance(m, Composition) and m.contains(part) for m in self.members)

    def __repr__(self) -> str:
        inner = ", ".join(repr(m) for m in self.members)
        extra = self._extra_repr()
        return f"{type(self).__name__}({inner}{', ' + extra if extra else ''})"

    def _extra_repr(self) -> str:
        return ""


class Sum(Composition):
    """Changes computed from the same input and base output, added."""


class Stack(Composition):
    """Each member reads the previous member's output."""


class Parallel(Composition):
    """The batch repeated once per member, outputs concatenated along the batch: the model's inputs
    are repeated when it is called (``state``), and every layer or site gives member i the rows
    ``[i B, (i + 1) B)``, as AdapterHub does."""

    def split(self, rows: int) -> BatchSplit:
        """The equal row split this composition means for a batch of ``rows`` (the repeated batch)."""
        copies = len(self.members)
        if rows % copies:
            raise AdapterError(f"{self!r}: {rows} rows cannot be {copies} copies of one batch; Parallel repeats the "
                               "model's inputs itself, so call the model with the original batch")
        return BatchSplit(*self.members, sizes=[rows // copies] * copies)


class Fuse(Composition):
    """AdapterFusion over the members' outputs (needs a fusion layer trained for these members)."""


@dataclass(frozen=True, init=False, repr=False)
class BatchSplit(Composition):
    """Member i adapts ``sizes[i]`` consecutive rows of the batch."""

    sizes: tuple[int, ...] = field(default=())

    def __init__(self, *members: str | Composition, sizes: Sequence[int]) -> None:
        super().__init__(*members)
        sizes = tuple(sizes)
        if len(sizes) != len(members) or not all(is_int(s) and s >= 0
                                                 for s in sizes):
            raise AdapterError(
                f"BatchSplit sizes={list(sizes)} must give one non-negative row count per member "
                f"({len(members)} members), e.g. BatchSplit('a', 'b', sizes=[2, 2])"
            )
        object.__setattr__(self, "sizes", sizes)

    def _extra_repr(self) -> str:
        return f"sizes={list(self.sizes)}"


@dataclass(frozen=True, init=False, repr=False)
class Average(Composition):
    """The members' outputs averaged with ``weights`` (equal weights by default)."""

    weights: tuple[float, ...] = field(default=())

    def __init__(self, *members: str | Composition, weights: Sequence[float] | None = None) -> None:
        super().__init__(*members)
        values = tuple(float(w) for w in weights) if weights is not None else (1.0 / len(members),) * len(members)
        if len(values) != len(members):
            raise AdapterError(
                f"Average weights={list(values)} must give one weight per member ({len(members)} members), "
                "e.g. Average('a', 'b', weights=[0.3, 0.7])"
            )
        object.__setattr__(self, "weights", values)

    def _extra_repr(self) -> str:
        return f"weights={list(self.weights)}"


BASE_NAMES = (None, "__base__")
"""What a route may give a row for "no adapter": None, or peft's name for the base."""


@dataclass(frozen=True, init=False, repr=False)
class Route(Composition):
    """Row ``i`` of a batch takes adapter ``rows[i]`` (None: the base model); the members are the
    distinct adapter names. A batch may also be ``k`` times as long as the route, each row repeated
    ``k`` times in place (``generate`` expanding rows for beams or several sequences, or a layer that
    sees every token of a row as a row of its own): row ``j`` then takes ``rows[j // k]``."""

    rows: tuple[str | None, ...] = field(default=())
    _cache: dict[tuple[Any, ...], Any] = field(default_factory=dict, compare=False, hash=False)

    def __init__(self, rows: Sequence[str | None]) -> None:
        if isinstance(rows, str) or not isinstance(rows, Sequence) or not rows:
            raise AdapterError(f"a route needs one adapter name (or None for the base) per batch row, got {rows!r}; "
                               'e.g. dt.routing(model, ["a", "b", None])')
        bad = [r for r in rows if r not in BASE_NAMES and not isinstance(r, str)]
        if bad:
            raise AdapterError(f"a route holds adapter names or None (the base) per row, got {bad[0]!r} "
                               f"({type(bad[0]).__name__})")
        cleaned = tuple(None if r in BASE_NAMES else r for r in rows)
        names = tuple(dict.fromkeys(r for r in cleaned if r is not None))
        object.__setattr__(self, "members", names)
        object.__setattr__(self, "rows", cleaned)
        object.__setattr__(self, "_cache", {})

    def single(self) -> str | None:
        """The adapter every row takes, when they all take the same one (else None)."""
        names = self.names()
        return names[0] if len(names) == 1 and None not in self.rows else None

    def repeats(self, rows: int) -> int:
        """How many times each route row is repeated in a batch of ``rows`` (see the class docstring)."""
        if rows % len(self.rows):
            raise AdapterError(f"the route gives {len(self.rows)} rows an adapter each but the batch has {rows} rows; "
                               "pass one adapter name (or None) per row of the batch")
        return rows // len(self.rows)

    def slots(self, rows: int, device: torch.device) -> Tensor:
        """For a batch of ``rows``: each row's adapter as its index in ``members`` (-1: the base)."""
        key = (rows, str(device))
        if key not in self._cache:  # every layer asks, once per forward: computed once per batch shape
            index = {name: i for i, name in enumerate(self.names())}
            owners = torch.tensor([index.get(r, -1) if r is not None else -1 for r in self.rows], device=device)
            self._cache[key] = owners.repeat_interleave(self.repeats(rows))
        return self._cache[key]

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, Tensor]]:
        """Each adapter's batch rows (an index tensor), for a batch of ``rows``; base rows are in none."""
        slots = self.slots(rows, device)
        key = (rows, str(device), "groups")
        if key not in self._cache:
            self._cache[key] = [(name, (slots == i).nonzero().flatten()) for i, name in enumerate(self.names())]
        groups: list[tuple[str, Tensor]] = self._cache[key]
        return groups

    def __repr__(self) -> str:
        return f"Route({list(self.rows)!r})"


NOTHING = Sum.__new__(Sum)
object.__setattr__(NOTHING, "members", ())
"""The empty composition: no adapter runs (the base model)."""


def as_composition(value: str | Sequence[str] | Composition) -> Composition:
    """A name means ``Sum(name)``, a list or tuple of names ``Sum(*names)``; a composition stays."""
    if isinstance(value, Composition):
        return value
    if isinstance(value, str):
        return Sum(value)
    names = tuple(value)
    return Sum(*names) if names else NOTHING


@dataclass
class Active:
    """The model's current composition, one object shared by reference by every wrapper."""

    composition: Composition = NOTHING
    users: tuple[str, ...] = ()
    """Adapters that run through the composition without being named in it: an adapter whose
    ``active_form`` is a part of it (a fusion, under its ``Fuse``)."""

    def names(self) -> tuple[str, ...]:
        return self.composition.names()

    def owners(self) -> tuple[str, ...]:
        """Every adapter in use, the ones running over others first: whose trained copy of a module
        (``modules_to_save``, e.g. a task head) serves the model."""
        return (*self.users, *self.names())


def without(composition: Composition, name: str) -> Composition:
    """``composition`` with adapter ``name`` taken out (a member left empty goes too, with its
    batch size or weight; a routed row goes to the base); used when an adapter is deleted."""
    if isinstance(composition, Route):
        rows = [None if r == name else r for r in composition.rows]
        return Route(rows) if any(r is not None for r in rows) else NOTHING
    kept: list[tuple[str | Composition, int]] = []
    for index, member in enumerate(composition.members):
        if isinstance(member, Composition):
            member = without(member, name)
            if member.members:
                kept.append((member, index))
        elif member != name:
            kept.append((member, index))
    members = tuple(m for m, _ in kept)
    if not members:
        return NOTHING
    if isinstance(composition, BatchSplit):
        return BatchSplit(*members, sizes=[composition.sizes[i] for _, i in kept])
    if isinstance(composition, Average):
        return Average(*members, weights=[composition.weights[i] for _, i in kept])
    return type(composition)(*members)


def splits_rows(composition: Composition | str) -> bool:
    """Whether ``composition`` gives some adapters only some rows of a batch (a route over several
    adapters, ``BatchSplit``, ``Parallel``, anywhere inside it)."""
    if isinstance(composition, str):
        return False
    if isinstance(composition, Route):
        return composition.single() is None
    return isinstance(composition, (BatchSplit, Parallel)) or any(splits_rows(m) for m in composition.members)


def row_weights(composition: Composition | str, name: str, rows: int) -> list[float] | None:
    """How much of adapter ``name``'s change each of ``rows`` batch rows gets under ``composition``
    (None: the adapter is not in it). For changes that act on the whole output at once (a bias):
    a ``Sum`` gives 1 to every row, ``Average`` the member's weight, ``BatchSplit`` 1 on its rows."""
    if isinstance(composition, str):
        return [1.0] * rows if composition == name else None
    if type(composition) is Sum:
        parts = [row_weights(m, name, rows) for m in composition.members]
        return _add([p for p in parts if p is not None])
    if isinstance(composition, Average):
        parts = [row_weights(m, name, rows) for m in composition.members]
        return _add([[w * v for v in p] for p, w in zip(parts, composition.weights) if p is not None])
    if isinstance(composition, Parallel):
        return row_weights(composition.split(rows), name, rows)
    if isinstance(composition, Route):
        if name not in composition.members:
            return None
        repeats = composition.repeats(rows)
        return [1.0 if owner == name else 0.0 for owner in composition.rows for _ in range(repeats)]
    if isinstance(composition, BatchSplit):
        if sum(composition.sizes) != rows:
            raise AdapterError(f"{composition!r}: the sizes add up to {sum(composition.sizes)} rows but the batch has {rows}")
        out, start, found = [0.0] * rows, 0, False
        for member, size in zip(composition.members, composition.sizes):
            part = row_weights(member, name, size)
            if part is not None:
                out[start:start + size], found = part, True
            start += size
        return out if found else None
    if name in composition.names():
        raise AdapterError(f"{composition!r}: adapter {name!r} changes a whole output at once (a bias); it combines "
                           "with dt.Sum, dt.Average, dt.BatchSplit, dt.Parallel and dt.Route only")
    return None


def _add(parts: list[list[float]]) -> list[float] | None:
    return [sum(values) for values in zip(*parts)] if parts else None
