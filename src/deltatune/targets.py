"""Which modules a config selects, with peft's rules. Pure functions over module names.

The rules (peft 0.21): ``exclude_modules`` and ``modules_to_save`` win first; a string
``target_modules`` is a regular expression matched against the whole name; a list matches an
equal name or a dotted suffix; ``layers_to_transform`` then keeps the modules whose layer index
(the first number after ``layers_pattern``, or the first ``.<n>.`` segment) is listed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

ALL_LINEAR = "all-linear"


def matches_names(names: str | Sequence[str], key: str) -> bool:
    """peft's name rule: a regex full match for a string, equality or dotted suffix for a list."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{name}") for name in names)


def layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer number in a module name, as peft finds it (the first one, not a nested index)."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return int(found["idx"]) if found else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
        if found:
            return int(found["idx"])
    return None


def is_saved_module(key: str, modules_to_save: Iterable[str]) -> bool:
    """Whether ``key`` is a module to save or lies inside one (adapters never go there)."""
    return any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in modules_to_save)


def is_target(
    key: str,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] = (),
) -> bool:
    """Whether the module named ``key`` is selected."""
    if exclude_modules and matches_names(exclude_modules, key):
        return False
    if modules_to_save and is_saved_module(key, modules_to_save):
        return False
    if not matches_names(target_modules, key):
        return False
    uses_layers = layers_to_transform is not None and not (
        isinstance(layers_to_transform, (list, tuple)) and len(layers_to_transform) == 0
    )
    if isinstance(target_modules, str) or key in target_modules or not uses_layers:
        return True
    index = layer_index(key, layers_pattern)
    if index is None:
        return False
    wanted = (layers_to_transform,) if isinstance(layers_to_transform, int) else tuple(layers_to_transform or ())
    return index in wanted


def _suffixes(name: str) -> list[str]:
    """Dotted suffixes of a name, shortest first: "a.b.c" -> ["c", "b.c", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def condense(targets: Iterable[str], others: Iterable[str]) -> tuple[str, ...]:
    """Fewer names that still select exactly ``targets`` among ``targets`` + ``others``.

    peft shortens long target lists this way (greedily, shortest suffix first, targets in the
    order of their suffix lists) and records the result in adapter_config.json; doing the same
    keeps deltatune's files equal to peft's. Returns the targets unchanged if nothing is shorter.
    """
    blocked = {suffix for name in others for suffix in _suffixes(name)}
    chosen: list[str] = []
    for name, options in sorted(((n, _suffixes(n)) for n in set(targets)), key=lambda item: item[1]):
        if any(name.endswith(f".{c}") for c in chosen):
            continue
        pick = next((s for s in options if s not in chosen and s not in blocked), None)
        if pick is not None:
            chosen.append(pick)
    unique = set(targets)
    return tuple(sorted(chosen)) if chosen and len(chosen) < len(unique) else tuple(sorted(unique))


def nearest_names(wanted: Iterable[str], names: Sequence[str], limit: int = 5) -> list[str]:
    """The module names closest to what was asked for, to suggest in an error message."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    found: list[str] = []
    for item in wanted:
        for match in difflib.get_close_matches(item, leaves + list(names), n=limit, cutoff=0.4):
            if match not in found:
                found.append(match)
    return found[:limit] if found else leaves[:limit]
