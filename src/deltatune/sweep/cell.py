"""One run of a sweep, trained by the same code as ``deltatune train`` (``train.run.train_run``).

``python -m deltatune.sweep OPTIONS.json RESULT.json`` (``__main__.py``) is how the runner starts a run in a
process of its own: it trains with the flat options in OPTIONS.json and writes what the run
measured to RESULT.json (atomically), or ``{"error": ...}`` and exit status 1 when it fails.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the platform cannot tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return rss_to_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rss_to_mib(max_rss: int) -> float:
    """``ru_maxrss`` in MiB: the kernel reports KiB on Linux, bytes on macOS."""
    return max_rss / (1024 * 1024) if sys.platform == "darwin" else max_rss / 1024


def train_cell(options: Mapping[str, Any]) -> dict[str, Any]:
    """Train one run from its flat options in this process; what it measured."""
    from ..train.options import split_options
    from ..train.run import train_run

    run, train = split_options(options)
    result = train_run(run, train)
    return {"metrics": result.metrics, "train_loss": result.train_loss, "steps": result.steps, "tokens": result.tokens,
            "train_seconds": result.train_seconds, "trainable_parameters": result.trainable_parameters,
            "base_parameters": result.base_parameters}


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """``value`` as JSON at ``path``, through a temporary file and a rename (never half written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(dict(value), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    options_file, result_file = (Path(a) for a in argv)
    options = json.loads(options_file.read_text(encoding="utf-8"))
    try:
        measured = train_cell(options)
    except Exception as error:  # noqa: BLE001 - any failure of the run is recorded as its result
        traceback.print_exc()
        write_json(result_file, {"error": f"{type(error).__name__}: {error}"})
        return 1
    write_json(result_file, {**measured, "peak_rss_mib": peak_rss_mib()})
    return 0
