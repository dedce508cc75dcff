"""d90 on MiniLM sentiment: the smallest intrinsic dimension d reaching 90% of full fine-tuning's accuracy.

Reads experiments/results/intrinsic_minilm.jsonl (experiments/intrinsic_minilm.yaml) and the full
fine-tuning rows of experiments/results/rank_ablation_minilm.jsonl (the same budget and evaluation),
and prints each cell's mean accuracy, the reference and d90. Run from the repository root:

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


if __name__ == "__main__":
    main()
