"""The metrics log and the progress display of a run: a fresh run's, a resumed run's, or the silent
ones of a rank other than 0 (one display and one log per run, written by rank 0)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from .progress import MetricsLog, Progress, rewind_log

LOG_NAME = "metrics.jsonl"


class Discard(io.StringIO):
    """A text stream that keeps nothing (the progress display of a rank other than 0)."""

    def write(self, text: str) -> int:
        return len(text)


class SilentLog(MetricsLog):
    """The metrics log of a rank other than 0: it counts records like rank 0's, and writes nothing."""

    def __init__(self, records: int = 0) -> None:
        self.records, self.writer = records, None

    def write(self, event: str, step: int, values: dict[str, Any]) -> None:
        self.records += 1


def progress_display(total_steps: int, step: int, enabled: bool, main: bool) -> Progress:
    """The progress display from ``step`` to ``total_steps``; a rank other than 0 shows nothing."""
    return Progress(total_steps, step, enabled, None if main else Discard())


def _tensorboard(output: Path, tensorboard: bool) -> Path | None:
    return output / "tensorboard" if tensorboard else None


def clear_earlier_run(output: Path) -> bool:
    """A fresh run must not leave an earlier run's checkpoints for a later --resume to pick up."""
    stale = [p for p in (output / "checkpoints", output / LOG_NAME) if p.exists()]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return bool(stale)


def fresh_log(output: Path, tensorboard: bool, main: bool, progress: Progress) -> MetricsLog:
    """The log of a run that starts afresh in ``output``, after clearing an earlier run's files there."""
    if not main:
        return SilentLog()
    if clear_earlier_run(output):
        progress.message(f"{output}: removed the checkpoints and metrics of an earlier run (fresh start; "
                         "pass resume=True / --resume to continue a run instead)")
    return MetricsLog(output / LOG_NAME, _tensorboard(output, tensorboard))


def resumed_log(output: Path, tensorboard: bool, main: bool, records: int | None, step: int) -> MetricsLog:
    """The log, cut back to the ``records`` it held at the checkpoint of ``step`` (None: cut by step)."""
    if not main:
        return SilentLog(records or 0)
    kept = rewind_log(output / LOG_NAME, records, step)
    return MetricsLog(output / LOG_NAME, _tensorboard(output, tensorboard), kept, purge_step=step + 1)
