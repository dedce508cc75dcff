"""What a run shows while it runs: a tqdm progress bar, a JSONL metrics log, optional TensorBoard."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where stderr is no terminal, yet a bar can be drawn)."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    kernel = get_ipython() if callable(get_ipython) else None
    return kernel is not None and "IPKernelApp" in getattr(kernel, "config", {})


def _bar(total: int, start_step: int, stream: TextIO, notebook: bool) -> Any:
    """tqdm's widget in a notebook that has ipywidgets, else its text bar (Jupyter redraws that one too)."""
    settings = {"total": total, "initial": start_step, "unit": "step", "dynamic_ncols": True}
    if notebook:
        try:
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm(**settings)
        except ImportError:  # tqdm's widget needs ipywidgets
            pass
    return tqdm(file=stream, **settings)


class Progress:
    """tqdm's bar on a terminal or in a notebook; elsewhere (a log file, CI) plain lines.

    The loss shown is the mean over the steps since the last ``metrics.jsonl`` "train" record, so
    at every logged step the bar, the plain line and the log show the same number (a single
    step's loss is noisier: 16 rows).
    """

    def __init__(self, total: int, start_step: int = 0, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.start_step = total, start_step
        self.stream = stream or sys.stderr
        notebook = enabled and stream is None and in_notebook()
        self.live = enabled and (notebook or self.stream.isatty())
        self.bar = _bar(total, start_step, self.stream, notebook) if self.live else None
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, loss: float, lr: float, tokens: int) -> str:
        """Move the bar to ``step``; return the plain line for ``step`` (what a log shows)."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        rate = f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {rate}", refresh=False)
            self.bar.update(step - self.bar.n)
        return f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {rate} ETA {_duration(eta)}"

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut short by a kill
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def rewind_log(path: Path, records: int | None, step: int) -> int:
    """Keep the log's first ``records`` records (``records`` None: those up to ``step``); returns how many.

    A run killed after its last checkpoint had logged steps that the resumed run logs again, so
    without this the log would repeat them. The kept lines go to a temporary file that then
    replaces the log, so a kill during the rewind leaves the old log or the new one, never half.
    """
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if records is not None:
        kept = lines[:records]
    else:  # a checkpoint from before records were counted
        kept = [line for line in lines if (line_step := _step_of(line)) is not None and line_step <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``; mirrors scalars to TensorBoard.

    ``records`` counts the lines in the log (those kept on resume, then each one written), so a
    checkpoint can say how much of the log belongs to it. ``purge_step`` (on resume) tells
    TensorBoard to drop the events the killed run wrote from that step on.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, records: int = 0,
                 purge_step: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.records = records
        self.writer: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)

    def write(self, event: str, step: int, values: dict[str, Any]) -> None:
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.records += 1
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
