"""Tables and plots from a sweep's results file, and nothing else: a report can always be made
again from the JSONL alone (``deltatune sweep report RESULTS.jsonl``).

A table has one row per cell, in the order the cells first appear in the file: the options the
cells set (columns for every option any cell sets; "—" where a cell leaves it to base), the runs
counted, then each chosen column as mean ± sample standard deviation (n - 1) over the cell's
successful seeds (the mean alone for one seed); by default every metric but one that only echoes
an option of the same name. A plot draws a metric against a numeric option
the cells set (``r``): one line per combination of the other options, mean ± std as error
bars, and every cell that does not set the option as a dashed horizontal reference line.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .grid import format_value
from .results import OK, latest, read_records

Record = Mapping[str, Any]
STANDARD_COLUMNS = ("trainable_percent", "peak_rss_mib", "train_seconds", "tokens_per_second")
"""Columns every table shows after the metrics unless columns are chosen."""
MISSING = "—"
LEGEND_INSIDE_AT_MOST = 5  # entries; more go beside the axes


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def format_stat(values: Sequence[float]) -> str:
    if not values:
        return MISSING
    mean, std = mean_std(values)
    return format_number(mean) if std is None else f"{format_number(mean)} ± {format_number(std)}"


def value_of(record: Record, column: str) -> float | None:
    """A column of a record: a metric by its name, else a top-level field; None when absent or not a number."""
    metrics = record.get("metrics") or {}
    value = metrics[column] if column in metrics else record.get(column)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cells_of(records: Sequence[Record]) -> dict[str, list[Record]]:
    """The last record of each run, grouped by cell in the order cells first appear."""
    cells: dict[str, list[Record]] = {}
    for record in latest(records).values():
        cells.setdefault(str(record["cell"]), []).append(record)
    return cells


def _first_seen(keys: Sequence[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(k for group in keys for k in group))


def measured_metrics(records: Sequence[Record]) -> list[str]:
    """The metrics the runs report, in first-seen order, less those that echo an option of the same name
    (a run in a random subspace reports its ``intrinsic_dim``, which its cell sets)."""
    options = {k for r in records for k in (*(r.get("options") or {}), *(r.get("settings") or {}))}
    return [m for m in _first_seen([list((r.get("metrics") or {})) for r in records]) if m not in options]


def default_columns(records: Sequence[Record]) -> list[str]:
    return [*measured_metrics(records), "train_loss", *STANDARD_COLUMNS]


def table(records: Sequence[Record], columns: Sequence[str] | None = None) -> str:
    """The markdown table of a sweep's results (see the module docstring)."""
    cells = cells_of(records)
    options = _first_seen([list(runs[0].get("settings") or {}) for runs in cells.values()])
    columns = list(columns) if columns else default_columns(records)
    lines = ["| " + " | ".join([*options, "runs", *columns]) + " |", "|" + "---|" * (len(options) + 1 + len(columns))]
    for runs in cells.values():
        settings = runs[0].get("settings") or {}
        good = [r for r in runs if r["status"] == OK]
        counted = f"{len(good)}" + (f" ({len(runs) - len(good)} failed)" if len(good) < len(runs) else "")
        stats = [format_stat([v for r in good if (v := value_of(r, c)) is not None]) for c in columns]
        row = [format_value(settings[o]) if o in settings else MISSING for o in options]
        lines.append("| " + " | ".join([*row, counted, *stats]) + " |")
    return "\n".join(lines) + "\n"


def failures(records: Sequence[Record]) -> list[str]:
    return [f"- {r['cell']} seed {r['seed']}: {r.get('error')}" for r in latest(records).values() if r["status"] != OK]


def numeric_options(records: Sequence[Record]) -> list[str]:
    """Options the cells set themselves whose values are numbers and take two values or more."""
    seen: dict[str, set[float]] = {}
    for record in records:
        for key, value in (record.get("settings") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                seen.setdefault(key, set()).add(float(value))
    return [k for k, values in seen.items() if len(values) > 1]


def plot(records: Sequence[Record], x: str, metric: str, path: Path) -> Path:
    """``metric`` against option ``x`` as a PNG at ``path`` (see the module docstring)."""
    plt = _pyplot()
    lines: dict[str, list[tuple[float, float, float]]] = {}
    references: list[tuple[str, float]] = []
    for name, runs in cells_of(records).items():
        values = [v for r in runs if r["status"] == OK and (v := value_of(r, metric)) is not None]
        if not values:
            continue
        settings = runs[0].get("settings") or {}
        mean, std = mean_std(values)
        if x not in settings:
            references.append((name, mean))
            continue
        others = ",".join(f"{k}={format_value(v)}" for k, v in settings.items() if k != x) or x
        lines.setdefault(others, []).append((float(settings[x]), mean, std or 0.0))
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        points.sort()
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                      capsize=3, label=label)
    for index, (label, value) in enumerate(references):
        axes.axhline(value, linestyle="--", color=f"C{len(lines) + index}", label=label)
    xs = [p[0] for points in lines.values() for p in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(x)
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    if len(lines) + len(references) > LEGEND_INSIDE_AT_MOST:  # a long legend would cover the points
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")  # "tight" widens the image to hold an outside legend
    plt.close(figure)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("deltatune sweep report", "plots", True, "plots need matplotlib, which is not installed",
                          "pip install 'deltatune[plot]', or pass --no-plots for the tables alone") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def combined_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The records of several results files, in order: one table over sweeps that share cells (a
    memory table that reuses runs of a rank ablation). A cell name found in two files
    must mean the same options there, or the rows would mix different experiments."""
    records: list[dict[str, Any]] = []
    options_of: dict[str, tuple[Path, Any]] = {}
    for path in paths:
        for record in read_records(path):
            cell, options = str(record["cell"]), record.get("options")
            first = options_of.setdefault(cell, (path, options))
            if first[1] != options:
                raise ConfigError("deltatune sweep report", "paths", [p.as_posix() for p in paths],
                                  f"cell {cell!r} has different options in {first[0]} and {path}, so its runs are "
                                  "not one experiment", "report those files separately")
            records.append(record)
    return records


def only_cells(records: Sequence[Record], names: Sequence[str]) -> list[Record]:
    """The records of the named cells, in the order of ``names`` (the table's row order)."""
    known = list(dict.fromkeys(str(r["cell"]) for r in records))
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError("deltatune sweep report", "--cells", missing, "names no cell of the results",
                          f"use cell names as the table prints them: {', '.join(known)}")
    return [r for name in names for r in records if r["cell"] == name]


def write_report(results: Path | Sequence[Path], output: Path | None = None, columns: Sequence[str] | None = None,
                 plot_x: Sequence[str] | None = None, plots: bool = True,
                 command: str | None = None, cells: Sequence[str] | None = None) -> tuple[Path, list[Path]]:
    """Write the markdown report of one results file or several (``combined_records``; default
    file: the first one's name with ``.md``) and its plots (in ``<report stem>_plots/`` beside it:
    each metric against each of ``plot_x``, default every numeric option the cells set);
    ``cells``: only these cells, in this order; ``command``: the command line that regenerates it,
    as the report should quote it."""
    paths = [results] if isinstance(results, Path) else list(results)
    records: Sequence[Record] = combined_records(paths)
    if cells:
        records = only_cells(records, cells)
    output = output or paths[0].with_suffix(".md")
    folder = output.with_name(f"{output.stem}_plots")
    made: list[Path] = []
    if plots:
        metrics = columns or measured_metrics(records)
        for x in plot_x if plot_x is not None else numeric_options(records):
            made += [plot(records, x, m, folder / f"{m}_vs_{x}.png") for m in metrics]
    names = " and ".join(p.name for p in paths)
    source = "the results file" if len(paths) == 1 else "the results files"
    text = [f"# Sweep results: {names}", "",
            f"Made by `{command or f'deltatune sweep report {paths[0].as_posix()}'}` from {source}; "
            "mean ± std over seeds.", "",
            table(records, columns)]
    if failed := failures(records):
        text += ["Failed runs:", "", *failed, ""]
    text += [f"![{p.stem}]({p.relative_to(output.parent).as_posix()})" for p in made]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(text).rstrip("\n") + "\n", encoding="utf-8")
    return output, made
