"""The results file of a sweep: one JSON object per line, one line per finished (or failed) run.

Lines are only ever appended, each with one ``write`` of the whole line on a file opened for
appending, then flushed to disk, so a line is either all there or (a crash in the middle of the
write) a torn last line, which readers skip with a warning. A run recorded twice (a failed run
retried, a cell run again after its options changed) counts by its last line.

Fields of a line (``SCHEMA``): see docs/experiments.md.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError

OK, FAILED = "ok", "failed"
SCHEMA: dict[str, str] = {
    "cell": "the cell's name: the options it sets beyond base, key=value joined by commas",
    "seed": "the run's seed",
    "status": f"{OK!r} or {FAILED!r}",
    "settings": "the options the cell sets beyond base",
    "options": "every option the run was given (base + settings), seed and output_dir excluded",
    "run_dir": "the run folder",
    "metrics": "the final evaluation's metrics (empty for a failed run)",
    "train_loss": "the mean loss of the last optimizer step",
    "steps": "optimizer steps made",
    "trainable_parameters": "parameters that trained",
    "base_parameters": "the model's own parameters, outside every adapter (a 4-bit weight as the out x in values it stores)",
    "trainable_percent": "100 x trainable_parameters / base_parameters",
    "tokens": "real (non-padding) training tokens seen",
    "train_seconds": "wall time of the training loop",
    "tokens_per_second": "tokens / train_seconds",
    "wall_seconds": "wall time of the whole run: start, data, model, training, evaluations, saving",
    "peak_rss_mib": "the peak resident memory of the run's process, in MiB (rss_scope says which process)",
    "rss_scope": "'run': a process of its own; 'sweep': the sweep's process, peak so far (--in-process)",
    "error": "why a failed run failed (null when it finished)",
    "finished_at": "UTC time the line was written",
}


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Add one line to the results file (created with its folder when missing), durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(record), sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(path, size) != b"\n":
            line = b"\n" + line  # a torn line stays alone on its line, and this one stays whole
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(size - 1)
        return handle.read(1)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every line of a results file, in order. A torn last line is skipped with a warning; a bad line
    elsewhere is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: no such results file; pass the JSONL a `deltatune sweep` wrote "
                        "(<output_dir>/results.jsonl unless the sweep file says `results:`)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {"cell", "seed", "status"} <= set(record):
                raise ValueError("not a result object")
        except ValueError as error:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: skipping a torn last line (a run stopped while writing it)",
                              stacklevel=2)
                continue
            raise DataError(f"{path}:{number}: not a sweep result line ({error}); delete the line (its run will run "
                            "again on the next `deltatune sweep`)") from None
        records.append(record)
    return records


def latest(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """The last record of every (cell, seed), in the order the runs first appear."""
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for record in records:
        out[(str(record["cell"]), int(record["seed"]))] = record
    return out
