"""d90 on MiniLM sentiment: the smallest intrinsic dimension d reaching 90% of full fine-tuning's accuracy.

Reads experiments/results/intrinsic_minilm.jsonl (experiments/intrinsic_minilm.yaml) and the full
fine-tuning rows of experiments/results/rank_ablation_minilm.jsonl (the same budget and evaluation),
prints each cell's mean accuracy, the reference and d90, and plots each d's best cell against the
reference and its 90% line (experiments/results/d90_minilm.png; needs matplotlib). Run from the
repository root:

    python experiments/d90_minilm.py
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import deltatune as dt
from deltatune.sweep import read_records
from deltatune.sweep.results import latest

RESULTS = Path("experiments/results")
METRIC = "accuracy"


def accuracy(row: Mapping[str, Any]) -> float | None:
    value = row.get("metrics", {}).get(METRIC)
    return float(value) if isinstance(value, (int, float)) else None


def main() -> None:
    reference_rows = latest(read_records(RESULTS / "rank_ablation_minilm.jsonl")).values()
    full = [value for row in reference_rows
            if row.get("options", {}).get("method") == "full" and (value := accuracy(row)) is not None]
    reference = statistics.fmean(full)
    rows = [row for row in latest(read_records(RESULTS / "intrinsic_minilm.jsonl")).values()
            if accuracy(row) is not None]
    cells: dict[str, list[float]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(accuracy(row))  # type: ignore[arg-type]
    print(f"full fine-tuning (reference): {reference:.4f} over {len(full)} seeds; 90%: {0.9 * reference:.4f}")
    for cell, values in sorted(cells.items()):
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        print(f"{cell}: {statistics.fmean(values):.4f}{spread} ({len(values)} seeds)")
    print(f"d90 = {dt.d90(rows, METRIC, reference)}")
    plot_best(rows, cells, reference, RESULTS / "d90_minilm.png")


def plot_best(rows: list[Mapping[str, Any]], cells: dict[str, list[float]], reference: float, path: Path) -> None:
    """Each d's best cell (mean ± std over seeds, as dt.d90 picks it) against the reference and 90% of it."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    dims = {row["cell"]: int(row["options"]["intrinsic_dim"]) for row in rows}
    best: dict[int, list[float]] = {}
    for cell, values in cells.items():
        if statistics.fmean(values) > statistics.fmean(best.get(dims[cell], [-1.0])):
            best[dims[cell]] = values
    xs = sorted(best)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.errorbar(xs, [statistics.fmean(best[d]) for d in xs], yerr=[statistics.stdev(best[d]) for d in xs],
                  marker="o", capsize=3, label="best learning rate per d (3 seeds)")
    axes.axhline(reference, linestyle="--", color="C1", label=f"full fine-tuning ({reference:.3f})")
    axes.axhline(0.9 * reference, linestyle=":", color="C2", label=f"90% of it ({0.9 * reference:.3f})")
    axes.set_xscale("log")
    axes.set_xlabel("intrinsic dimension d")
    axes.set_ylabel(METRIC)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
