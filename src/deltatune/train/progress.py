"""What a run shows while it runs: a progress line, a JSONL metrics log, optional TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on a terminal (redrawn in place); plain log lines elsewhere."""

    def __init__(self, total: int, start_step: int = 0, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.start_step = total, start_step
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, loss: float, lr: float, tokens: int) -> str:
        """Redraw the bar for ``step``; return the line."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        width = 24
        filled = int(width * step / max(1, self.total))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s ETA {_duration(eta)}")
        if self.live:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        return line

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        self.stream.write(("\r\x1b[K" if self.live else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.writer: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, event: str, step: int, values: dict[str, Any]) -> None:
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
