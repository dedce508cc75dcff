"""How to train: the options of the training loop, frozen and checked when built.

Each field's ``metadata["help"]`` is the documentation the ``deltatune train --help`` page
shows, so the library and the command line describe an option in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")
MAX_LR = 1.0
"""AdamW moves every trainable value by up to about ``lr`` per step, so above 1 a run can only wreck the weights."""
OPTIMIZERS = ("adamw", "adamw8bit")


DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)")
UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """Seconds in ``600``, ``90s``, ``10m``, ``1.5h`` or ``1h30m`` ('' or 0: none); -1 when ``text`` is none of these."""
    text = str(text).strip().lower()
    if not text:
        return 0.0
    parts = list(DURATION.finditer(text))
    if not parts or "".join(m.group(0) for m in parts).replace(" ", "") != text.replace(" ", ""):
        return -1.0
    return sum(float(m.group(1)) * UNIT_SECONDS[m.group(2)] for m in parts)


def _help(text: str, **extra: Any) -> Any:
    return field(default=extra.pop("default"), metadata={"help": text, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Options of :class:`deltatune.train.Trainer`."""

    output_dir: str = _help("folder for the adapter, checkpoints and metrics.jsonl", default="runs/deltatune")
    max_steps: int = _help("optimizer steps; 0 = derive from --epochs", default=0)
    epochs: float = _help("passes over the training data when --max-steps is 0", default=1.0)
    batch_size: int = _help("examples per micro-batch", default=16)
    grad_accum: int = _help("micro-batches per optimizer step (effective batch = batch_size x grad_accum)",
                            default=1)
    lr: float = _help("peak learning rate", default=2e-3)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    optimizer: str = _help("adamw (fp32 states, 8 bytes per parameter) or adamw8bit (blockwise 8-bit states, "
                            "about 2 bytes per parameter)", default="adamw", choices=OPTIMIZERS)
    schedule: str = _help("learning-rate schedule after warm-up", default="linear", choices=SCHEDULES)
    warmup_ratio: float = _help("fraction of the steps spent warming up linearly from 0", default=0.1)
    max_grad_norm: float = _help("clip the gradient norm to this; 0 = no clipping", default=1.0)
    bf16: bool = _help("bf16 autocast for the forward pass (CPU and CUDA)", default=False)
    fsdp: bool = _help("under torchrun, shard the model with torch's FSDP2 (fully_shard: each transformer block, then "
                       "the root): the frozen base is split across ranks, the adapter trains sharded; with --bf16 the "
                       "parameters are gathered in bf16", default=False)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    accelerate: bool = _help("fused kernels for the frozen base (dt.accelerate: LLaMA, Mistral, Qwen2, Qwen3, GPT-2): "
                             "results equal within fp32 rounding, faster steps, less memory", default=False)
    retain_freed_memory: bool = _help("keep freed memory mapped in this process (glibc only): fewer page "
                                      "faults per step, for a higher peak RSS", default=False)
    eval_every: int = _help("evaluate every N steps (and at the end); 0 = only at the end", default=0)
    eval_batch_size: int = _help("examples per evaluation batch", default=64)
    early_stopping: int = _help("stop after N evaluations without improvement; 0 = never", default=0)
    save_every: int = _help("write a checkpoint every N steps; 0 = never", default=0)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=2)
    log_every: int = _help("log loss, lr and throughput every N steps", default=10)
    tensorboard: bool = _help("also write TensorBoard event files (needs the tensorboard package)",
                              default=False)
    progress: bool = _help("show a progress bar on a terminal", default=True)
    seed: int = _help("seed for initialisation, data order and dropout", default=0)
    max_time: str = _help("wall-clock budget for the training steps: seconds, or with a unit (90s, 10m, 1.5h, 1h30m); "
                          "when spent, training stops and evaluates and saves as at a normal end; '' = none",
                          default="")
    max_norm_growth: float = _help("stop as diverged when one optimizer step grows the trainable parameters' joint "
                                   "L2 norm by more than this factor (a norm below 1 counts as 1); 0 = off",
                                   default=10.0)
    max_param_value: float = _help("stop as diverged when a trainable parameter's magnitude exceeds this "
                                   "(adapter weights stay far below); 0 = off", default=1e4)

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every", "early_stopping", "save_every"):
            self._check(getattr(self, name) >= 0, name, "must be >= 0", "pass 0 or a positive number")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "log_every"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1", "pass a positive integer")
        self._check(self.max_steps > 0 or (math.isfinite(self.epochs) and self.epochs > 0), "epochs",
                    "must be > 0 when max_steps is 0", "pass --epochs > 0 or --max-steps")
        self._check(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number", "e.g. 5e-4")
        self._check(self.lr <= MAX_LR, "lr", f"must be at most {MAX_LR:g}: AdamW moves every trainable value by up to "
                    "about lr per step, so a larger lr can only wreck the weights", "e.g. 2e-3 (low-rank adapters train well from 1e-4 to 1e-2)")
        self._check(self.max_norm_growth == 0 or self.max_norm_growth > 1, "max_norm_growth", "must be 0 (off) or > 1",
                    "e.g. 10")
        self._check(self.max_param_value >= 0, "max_param_value", "must be >= 0", "pass 0 to disable the check")
        self._check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)", "e.g. 0.1")
        self._check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", "pass 0 to disable clipping")
        self._check(self.weight_decay >= 0, "weight_decay", "must be >= 0", "e.g. 0.01")
        for name, choices in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS)):
            self._check(getattr(self, name) in choices, name, f"must be one of {choices}", f"pick one of {choices}")
        self._check(duration_seconds(self.max_time) >= 0, "max_time", "must be a duration",
                    "seconds (600) or with units s, m, h (10m, 1h30m)")
        self._check(self.early_stopping == 0 or self.eval_every > 0, "early_stopping",
                    "needs evaluations during training", "also pass --eval-every N")

    @property
    def max_seconds(self) -> float:
        """``max_time`` in seconds (0: no budget)."""
        return duration_seconds(self.max_time)

    def _check(self, ok: bool, name: str, why: str, fix: str) -> None:
        if not ok:
            raise ConfigError(type(self).__name__, name, getattr(self, name), why, fix)
