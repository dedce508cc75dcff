"""``TrainConfig.max_time``: the wall-clock budget of a training loop.

When it is spent the run stops after the step in progress, then evaluates and saves as at its planned
end. Every rank takes rank 0's reading of the clock, so all ranks stop after the same step.
"""

from __future__ import annotations

import time

from . import distributed


class TimeBudget:
    """A clock started when the loop starts, and the seconds it may run (0: no limit)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the loop started."""
        return time.perf_counter() - self.started

    def spent(self) -> bool:
        """Whether the budget has run out (rank 0's answer, on every rank)."""
        if not self.seconds:
            return False
        return bool(distributed.broadcast_object(self.elapsed() >= self.seconds))
