"""The learning-rate schedules equal transformers.get_scheduler's at every step (the oracle)."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from deltatune.train.schedule import make_scheduler, warmup_steps

HF_NAME = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """The learning rate each optimizer step runs with, as a training loop sees it."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total,ratio", [(250, 0.1), (30, 0.1), (10, 0.2), (7, 0.0), (1, 0.5), (100, 0.33)])
def test_schedule_equals_transformers_step_by_step(schedule: str, total: int, ratio: float) -> None:
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    ours = make_scheduler(ours_opt, schedule, total, ratio)
    # TrainingArguments(warmup_steps=ratio < 1) warms up for ceil(total * ratio) steps
    hf = get_scheduler(HF_NAME[schedule], hf_opt, num_warmup_steps=warmup_steps(total, ratio), num_training_steps=total)
    assert _lrs(ours, ours_opt, total) == _lrs(hf, hf_opt, total)  # the same floats, not merely close


def test_warmup_steps_round_up_as_transformers() -> None:
    from transformers import TrainingArguments

    for total, ratio in [(250, 0.1), (30, 0.1), (7, 0.25), (3, 0.0)]:
        args = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
        assert warmup_steps(total, ratio) == args.get_warmup_steps(total)


def test_first_warmup_step_runs_at_zero_and_the_peak_after_warmup() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(make_scheduler(optimizer, "linear", 10, 0.2), optimizer, 10)
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] == pytest.approx(0.125)
