"""Checks of plain values that configs, compositions and the command line share."""

from __future__ import annotations

from typing import TypeGuard


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (``True`` is an ``int`` to Python, never a count or an index to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    """An int >= 1 (a bool is not one), as config fields that count things need."""
    return is_int(value) and value >= 1
