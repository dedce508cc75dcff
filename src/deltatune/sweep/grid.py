"""A sweep file (YAML) and the cells it expands to.

A sweep file is a mapping::

    output_dir: runs/sweeps/rank      # run folders go under it (default: runs/sweeps/<file stem>)
    results: experiments/rank.jsonl   # the results file (default: <output_dir>/results.jsonl)
    seeds: [0, 1, 2]                  # every cell runs once per seed (default: [0])
    base: {max_steps: 200, lr: 2e-3}  # options every cell shares (any `deltatune train` option)
    grid: {r: [1, 8, 64]}             # option -> values: the cells are every combination
    cells:                            # and/or explicit combinations, each on top of `base`
      - {method: full, lr: 5.0e-5}

Options are the keys of ``deltatune train --config`` files (``-`` or ``_``). ``seed`` and
``output_dir`` belong to the sweep, not to a cell. The order of cells is fixed: the grid's
combinations with its first key varying slowest, then ``cells`` as listed; each cell runs its
seeds in the listed order. A cell's name lists the options it sets beyond ``base``
(``r=8``, ``method=full,lr=5e-05``); its runs are ``<output_dir>/<name as a folder>/seed-<s>``
(``folder_name``: a long name, such as one that lists file paths, is cut and ends in a hash).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..values import is_int

SPEC_KEYS = ("output_dir", "results", "seeds", "base", "grid", "cells")
RESERVED = ("seed", "output_dir")
"""Options a sweep sets for each run itself."""
DEFAULT_RESULTS = "results.jsonl"
MAX_FOLDER = 120
"""The longest run folder name kept whole. File systems refuse a name over 255 bytes, and a cell
that sets file paths (a model, a train file: one sweep over several tasks) easily names more."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a combination of options at one seed."""

    name: str
    """The options this cell sets beyond ``base``, as ``key=value`` joined by commas (seed excluded)."""
    seed: int
    settings: Mapping[str, Any]
    """The options the cell sets beyond ``base`` (what its name says)."""
    options: Mapping[str, Any]
    """Every option of the run: ``base``, then the cell's settings (output_dir and seed not included)."""
    run_dir: Path

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.seed

    def run_options(self) -> dict[str, Any]:
        """The flat options ``deltatune train`` gets for this run."""
        return {**self.options, "seed": self.seed, "output_dir": str(self.run_dir)}


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    output_dir: Path
    results: Path
    seeds: tuple[int, ...] = (0,)
    base: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    cells: tuple[Mapping[str, Any], ...] = ()


def _fail(source: str, key: str, value: Any, why: str, fix: str) -> ConfigError:
    return ConfigError(f"sweep file {source}", key, value, why, fix)


def _options(source: str, where: str, value: Any) -> dict[str, Any]:
    """A mapping of options with ``-`` in keys read as ``_``; the sweep's own keys refused."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, where, value, "must be a mapping of option: value", f"write `{where}:` then `option: value` lines")
    options = {str(k).replace("-", "_"): v for k, v in value.items()}
    taken = [k for k in RESERVED if k in options]
    if taken:
        raise _fail(source, f"{where}.{taken[0]}", options[taken[0]], "is set by the sweep for each run",
                    "list seeds under `seeds:` and the folder under `output_dir:` at the top level")
    return options


def parse_spec(data: Any, source: str = "<memory>", default_dir: Path | None = None) -> SweepSpec:
    """A :class:`SweepSpec` from the mapping a sweep file holds; every problem is a ConfigError naming the key."""
    if not isinstance(data, Mapping):
        raise _fail(source, "(file)", type(data).__name__, "must be a YAML mapping", f"use the keys {SPEC_KEYS}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise _fail(source, unknown[0], data[unknown[0]], "is not a sweep key",
                    f"use {SPEC_KEYS}; train options go under `base:`, `grid:` or `cells:`")
    seeds = data.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(is_int(s) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise _fail(source, "seeds", seeds, "must be a non-empty list of distinct integers", "e.g. seeds: [0, 1, 2]")
    grid = _options(source, "grid", data.get("grid"))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(source, f"grid.{key}", values, "must be a non-empty list of values", f"e.g. {key}: [1, 8]")
    cells = data.get("cells") or []
    if not isinstance(cells, list):
        raise _fail(source, "cells", cells, "must be a list of option mappings", "e.g. cells: [{method: full}]")
    folder = data.get("output_dir")
    if folder is not None and not isinstance(folder, str):
        raise _fail(source, "output_dir", folder, "must be a folder path", "e.g. output_dir: runs/sweeps/rank")
    output_dir = Path(folder) if folder else (default_dir or Path("runs/sweeps/sweep"))
    results = data.get("results", str(output_dir / DEFAULT_RESULTS))
    if not isinstance(results, str) or not results:
        raise _fail(source, "results", results, "must be a file path", "e.g. results: experiments/rank.jsonl")
    return SweepSpec(output_dir, Path(results), tuple(seeds), _options(source, "base", data.get("base")), grid,
                     tuple(_options(source, f"cells[{i}]", c) for i, c in enumerate(cells)))


def read_spec(path: Path) -> SweepSpec:
    """Read and check a sweep file."""
    import yaml

    if not path.is_file():
        raise ConfigError("deltatune sweep", "config", str(path), "no such file", "pass an existing sweep YAML file")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return parse_spec(data, str(path), Path("runs/sweeps") / path.stem)


def format_value(value: Any) -> str:
    """An option value as a cell name shows it (lists joined by +)."""
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def folder_name(name: str) -> str:
    """A cell name as a folder name: characters outside letters, digits and ``.=+-`` become ``_``; a
    name longer than ``MAX_FOLDER`` is cut and ends in ``-`` and a hash of the whole cell name, so the
    folder stays short enough to create and still one cell's own."""
    folder = re.sub(r"[^A-Za-z0-9.=+\-]", "_", name.replace(",", "__")) or "base"
    if len(folder) <= MAX_FOLDER:
        return folder
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return f"{folder[:MAX_FOLDER - len(digest) - 1]}-{digest}"


def combinations(spec: SweepSpec) -> list[dict[str, Any]]:
    """What each cell sets beyond ``base``: the grid's combinations (first key slowest), then ``cells``."""
    keys = list(spec.grid)
    settings = [dict(zip(keys, values)) for values in itertools.product(*(spec.grid[k] for k in keys))] if keys else []
    settings += [dict(c) for c in spec.cells]
    return settings or [{}]


def expand(spec: SweepSpec) -> list[Cell]:
    """Every run of the sweep, in order: cells x seeds. Two cells with the same name are refused."""
    runs: list[Cell] = []
    seen: dict[str, dict[str, Any]] = {}
    for given in combinations(spec):
        settings = _float_strings(given)
        name = ",".join(f"{k}={format_value(v)}" for k, v in settings.items()) or "base"
        options = _float_strings({**spec.base, **settings})
        if name in seen:
            raise ConfigError("sweep", "cells", name, "names the same combination twice",
                              "drop the repeated entry (a `cells:` entry may repeat a grid combination)")
        if folder_name(name) in {folder_name(n) for n in seen}:
            raise ConfigError("sweep", "cells", name, "gives the same run folder as another cell",
                              "make the option values differ in letters or digits")
        seen[name] = options
        for seed in spec.seeds:
            runs.append(Cell(name, seed, settings, options, spec.output_dir / folder_name(name) / f"seed-{seed}"))
    return runs


def _float_strings(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options with a float option's number-like string read as a float: YAML 1.1 (PyYAML) reads
    ``5e-5`` (no dot) as a string."""
    from ..train.options import option_table

    floats = {f.name for _, f in option_table() if str(f.type) == "float"}
    out = dict(options)
    for key, value in options.items():
        if key in floats and isinstance(value, str):
            try:
                out[key] = float(value)
            except ValueError:
                pass  # left for the option's own type check, which names it
    return out


def check_options(cells: Sequence[Cell]) -> None:
    """Build every run's options as ``deltatune train`` would, so a misspelt or mistyped option stops
    the sweep before its first run."""
    from ..train.options import split_options

    for cell in cells:
        try:
            split_options(cell.run_options())
        except ConfigError as error:
            error.args = (f"sweep cell {cell.name!r}: {error}",)  # the same error, saying which cell
            raise
