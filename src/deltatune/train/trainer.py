"""The training loop: batches, loss, optimizer, schedule, evaluation, checkpoints and resume.

The pieces it puts together live in their own modules: which rows micro-batch ``k`` holds (``batches.py``,
``stream.py``: a pure function of (seed, epoch, position), so a checkpoint needs only the step), the
divergence checks run on every step before anything is counted or saved (``guard.py``), the losses and
statistics the model reports besides the task's (``signals.py``), the wall-clock budget (``time_budget.py``),
the log and display (``run_log.py``, ``progress.py``), the checkpoint files (``checkpoint.py``) and the
glue to data parallelism and FSDP2 sharding (``parallel.py``). The checkpoint also keeps the running
counters of the log (tokens seen, the losses since the last log line, how many log records there were),
so a resumed run's ``metrics.jsonl`` reads as one run, and with the optimizer, scheduler and
random-generator states 10 steps + resume + 10 steps give the same adapter as 20 straight steps.

Under torchrun (``WORLD_SIZE`` > 1) the run is data parallel (``distributed.py``, ``parallel.py``): an
N-process run computes the update of a 1-process run with N times the micro-batch, every rank holds the
same adapter, each rank evaluates its slice of the evaluation rows and the per-row outputs are gathered
(``eval_shard.py``); rank 0 alone writes the log, checkpoints, ``best/``, the adapter and the progress
display. With ``TrainConfig.fsdp`` the model is sharded with FSDP2 instead (``fsdp.py``): the same data
order and loss weighting, every rank evaluates its slice (in as many forward passes as every other rank)
and joins every gather of the adapter (saves, checkpoints), and rank 0 writes the same files.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..io import save
from ..registry import GroupsFor
from ..state import unwrap
from . import distributed, eval_shard, fsdp, parallel
from .batches import MicroBatches, batch_source, check_same_batches, micro_batch, planned_steps
from .checkpoint import latest_checkpoint, read_trainer_state, restore_adapters, rng_state, set_rng_state, write_checkpoint
from .config import TrainConfig
from .guard import check_resumed, clipped_gradient_norm, divergence, parameter_stats, stop_error
from .lock import own_folder
from .prepare import apply_memory_options, base_parameters, enable_gradient_checkpointing, make_optimizer, trainable
from .progress import MetricsLog, Progress
from .run_log import fresh_log, progress_display, resumed_log
from .schedule import make_scheduler
from .signals import LossTerm, TrainingSignals, find_signals, full_loss, signal_statistics
from .stream import FeatureStream
from .tasks.base import Features, Task
from .time_budget import TimeBudget

# besides the trainer, what callers import from here (the pieces live in the modules named above)
__all__ = ["LossTerm", "MicroBatches", "StepCallback", "TrainResult", "Trainer", "TrainingSignals", "divergence",
           "enable_gradient_checkpointing", "planned_steps", "seed_everything", "trainable"]

StepCallback = Callable[[int], None]
"""Called with the global step after each optimizer step, before gradients are cleared."""


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (model initialisation, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    stopped_early: bool = False
    adapter_dir: Path | None = None
    tokens: int = 0
    """Real (non-padding) training tokens seen, over all processes (``tokens_in``)."""
    train_seconds: float = 0.0
    """Wall time of this call's training loop (evaluations during training included; the final one not)."""
    trainable_parameters: int = 0
    """Parameters that trained (each shared one counted once)."""
    base_parameters: int = 0
    """The model's own parameters, outside every adapter (the denominator of "trainable %")."""
    out_of_time: bool = False
    """Training stopped before ``total_steps`` because ``TrainConfig.max_time`` was spent."""


class Trainer:
    """Train a delta-tuned model on a task; evaluate, checkpoint and resume."""

    def __init__(self, model: nn.Module, task: Task, train_features: Sequence[Features] | FeatureStream,
                 eval_features: Sequence[Features] = (), config: TrainConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, callbacks: Sequence[StepCallback] = (),
                 loss_terms: Sequence[LossTerm] = (), param_groups: GroupsFor | None = None) -> None:
        # a DDP-wrapped model trains as the model inside: gradients are synchronised here, without its hooks
        model = unwrap(model)
        self.model, self.task, self.config = model, task, config or TrainConfig()
        # a FeatureStream (train/stream.py) is read as it trains, never listed whole
        self.train_features = train_features if isinstance(train_features, FeatureStream) else list(train_features)
        self.eval_features = list(eval_features)
        cfg = self.config
        self.device = next(iter(trainable(model) or model.parameters())).device  # batches go where the adapter lives
        self.owns_group = distributed.start(self.device)  # under torchrun without a group set up by the caller
        self.world = distributed.current()
        self.sharded = parallel.shard_if_asked(model, cfg, optimizer)  # before the optimizer, which holds the shards
        self.optimizer = optimizer or make_optimizer(model, cfg, param_groups)  # groups: the method's (registry)
        self.params = trainable(model)
        self.total_steps, self.stream = batch_source(self.train_features, cfg, self.world)
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, self.total_steps, cfg.warmup_ratio)
        self.callbacks, self.loss_terms = list(callbacks), list(loss_terms)
        self.signals = find_signals(model)
        self.output = Path(cfg.output_dir)
        self.step = 0
        self.best: float | None = None
        self.evals_without_improvement = 0
        # running counters of the log, kept in checkpoints so that a resumed run continues them
        self.tokens = 0
        self.window: list[float] = []  # losses of the steps since the last "train" log record
        self.last_loss = math.nan
        self.log_records: int | None = 0  # records in metrics.jsonl; None: unknown (an older checkpoint)
        self.param_norm = math.nan  # the trainable parameters' norm after the last step (for divergence)
        apply_memory_options(model, cfg)

    # -- state ---------------------------------------------------------------------------
    def state(self, log_records: int | None = None) -> dict[str, Any]:
        """What a checkpoint stores besides the adapters; ``log_records``: the lines metrics.jsonl holds
        (None: unknown, then a resume cuts the log at the step instead). Sharded, every rank must call it."""
        return {"step": self.step, "micro_batches": self.step * self.config.grad_accum,
                "optimizer": parallel.optimizer_state(self.optimizer, self.sharded),
                "scheduler": self.scheduler.state_dict(),
                "best": self.best, "evals_without_improvement": self.evals_without_improvement, "rng": rng_state(),
                "tokens": self.tokens, "loss_window": list(self.window), "last_loss": self.last_loss,
                "log_records": log_records, "world_size": self.world.size,
                "global_micro_batch": self.config.batch_size * self.world.size}

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``output_dir``; False when there is none."""
        folder = latest_checkpoint(self.output / "checkpoints")
        if folder is None:
            return False
        state = read_trainer_state(folder)
        check_same_batches(state, folder, self.config.batch_size, self.world)
        with parallel.whole(self.model, self.sharded, write_back=True):
            restore_adapters(self.model, folder)  # sharded: into whole copies, whose slices go back to the shards
        parallel.load_optimizer_state(self.optimizer, state["optimizer"], self.sharded)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best = int(state["step"]), state["best"]
        self.evals_without_improvement = int(state["evals_without_improvement"])
        set_rng_state(state["rng"])
        # checkpoints written before these counters existed: tokens restart at 0, the log is cut by step
        self.tokens = int(state.get("tokens", 0))
        self.window = [float(x) for x in state.get("loss_window", [])]
        self.last_loss = float(state.get("last_loss", math.nan))
        records = state.get("log_records")
        self.log_records = int(records) if records is not None else None
        check_resumed(self.params, self.config, folder)
        return True

    def _checkpoint(self, log_records: int, loss: float) -> None:
        """Rank 0 writes a checkpoint; sharded, every rank first gathers the adapter and optimizer states."""
        if not parallel.joins_saves(self.world, self.sharded):
            return
        with parallel.whole(self.model, self.sharded):
            state = self.state(log_records)
            if self.world.main:
                write_checkpoint(self.output / "checkpoints", self.model, state,
                                 {"step": self.step, "loss": loss}, self.config.keep_checkpoints)

    # -- one step ------------------------------------------------------------------------
    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens), over all ranks."""
        cfg, losses, tokens = self.config, [], 0
        for micro in range(cfg.grad_accum):
            fsdp.set_gradient_sync(self.model, micro == cfg.grad_accum - 1)  # FSDP2 reduces in backward
            batch = micro_batch(self.task, self.stream, self.train_features, self.step * cfg.grad_accum + micro,
                                self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = full_loss(lambda: self.task.loss(self.model, batch), self.loss_terms, self.signals)
            value = float(loss.detach())  # detached: a scalar of a graph tensor warns, and needs no graph
            value, share, counted = parallel.global_loss(value, batch, self.task, self.world, self.device)
            if not math.isfinite(value):  # the global value: every rank stops together, none waits for another
                self._stop(f"the training loss became {value}", applied=False)
            if share:  # a rank whose rows hold no loss terms has nothing to add (and its own mean is 0/0)
                (loss * share / cfg.grad_accum).backward()
            losses.append(value)
            tokens += counted
        parallel.sync_gradients(self.params, self.sharded)
        self._clip_and_check_gradients()
        self.optimizer.step()
        self._check_update()
        self.scheduler.step()
        self.step += 1
        for callback in self.callbacks:
            callback(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), tokens

    def _clip_and_check_gradients(self) -> None:
        """Clip to ``max_grad_norm``; a NaN/inf gradient norm stops before the update is applied."""
        norm = clipped_gradient_norm(self.params, self.config.max_grad_norm)
        if not math.isfinite(norm):
            self._stop(f"the gradient norm became {norm}", applied=False)

    def _check_update(self) -> None:
        """Stop if the update just applied diverged (see ``guard.py``); else remember the new norm."""
        norm, peak = parameter_stats(self.params)
        why = divergence(self.param_norm, norm, peak, self.config)
        if why:
            self._stop(why, applied=True)
        self.param_norm = norm

    def _stop(self, why: str, applied: bool) -> NoReturn:
        """Raise the TrainingError of a diverged step, naming it and the last checkpoint (all on disk are good)."""
        self.optimizer.zero_grad(set_to_none=True)
        raise stop_error(why, applied, self.step + 1, self.output / "checkpoints")

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the evaluation features (empty when there are none).

        Distributed, each rank evaluates its slice of the rows and every rank scores the gathered outputs
        (``eval_shard.py``); rank 0's metrics are then handed to all, so every rank takes the same
        early-stopping and best-adapter decisions, however its floats rounded. A task without per-row
        outputs is evaluated whole by rank 0 (sharded: by every rank, as every forward is a collective).
        """
        if not self.eval_features:
            return {}
        split = self.world.distributed and eval_shard.splits(self.task)
        metrics = self._evaluate_here(split) if split or self.world.main or self.sharded else {}
        return dict(distributed.broadcast_object(metrics))

    def _evaluate_here(self, split: bool) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        task, features, batch_size = self.task, self.eval_features, self.config.eval_batch_size
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                if split:
                    return eval_shard.evaluate(task, self.model, features, batch_size)
                return task.evaluate(self.model, features, batch_size)
        finally:
            self.model.train(was_training)

    def _record_eval(self, metrics: dict[str, float]) -> bool:
        """Track the best metric (saving that adapter); True when early stopping says stop."""
        value = metrics.get(self.task.metric)
        if value is None:
            return False
        if self.best is None or value > self.best:
            self.best, self.evals_without_improvement = value, 0
            if parallel.joins_saves(self.world, self.sharded):
                save(self.model, self.output / "best")
            return False
        self.evals_without_improvement += 1
        return 0 < self.config.early_stopping <= self.evals_without_improvement

    # -- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``total_steps`` (or until early stopping); save the final adapter.

        The output folder is locked for the whole call: a second run on it (another process)
        is refused with a ConfigError before it changes anything. Distributed, rank 0 holds the lock
        and writes; a process group this trainer started is destroyed at the end, also on error.
        """
        try:
            with own_folder(self.output) if self.world.main else contextlib.nullcontext():
                return self._fit(resume)
        finally:
            if self.owns_group:
                distributed.stop()
                self.owns_group = False

    def _fit(self, resume: bool) -> TrainResult:
        cfg = self.config
        resumed = resume and self.resume()
        # ranks other than 0 keep quiet: one display and one log per run
        progress = progress_display(self.total_steps, self.step, cfg.progress, self.world.main)
        log = self._open_log(resumed, progress)
        if not self.sharded:  # fsdp.shard made them equal before sharding
            distributed.broadcast_parameters(self.params)  # identical adapters on every rank, however they were built
        self.param_norm = parameter_stats(self.params)[0]
        self.model.train()
        budget = TimeBudget(cfg.max_seconds)
        try:
            stopped_early, out_of_time = self._loop(log, progress, budget)
        finally:
            progress.close()
        seconds = budget.elapsed()
        metrics = self.evaluate()
        if metrics:
            log.write("eval", self.step, metrics)
            self._record_eval(metrics)
        log.close()
        writes = parallel.joins_saves(self.world, self.sharded)
        adapter_dir = save(self.model, self.output / "adapter") if writes else self.output / "adapter"
        distributed.barrier()  # when fit returns on any rank, the adapter is on disk
        return TrainResult(self.step, self.last_loss, metrics, self.best, stopped_early, adapter_dir, self.tokens, seconds,
                           sum(p.numel() for p in self.params), base_parameters(self.model), out_of_time)

    def _open_log(self, resumed: bool, progress: Progress) -> MetricsLog:
        """The log cut back to the checkpoint resumed from, or a fresh one (clearing an earlier run's files)."""
        tensorboard, main = self.config.tensorboard, self.world.main
        if resumed:
            progress.message(f"resumed from step {self.step} ({self.output / 'checkpoints'})")
            return resumed_log(self.output, tensorboard, main, self.log_records, self.step)
        return fresh_log(self.output, tensorboard, main, progress)

    def _loop(self, log: MetricsLog, progress: Progress, budget: TimeBudget) -> tuple[bool, bool]:
        """Train to ``total_steps``, early stopping or the end of ``budget``; (stopped early, out of time)."""
        cfg, stopped_early = self.config, False
        while self.step < self.total_steps and not stopped_early:
            loss, tokens = self._train_step()
            self._log_step(loss, tokens, log, progress)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                stopped_early = self._evaluate_during(log, progress)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self._checkpoint(log.records, loss)
            if budget.spent():
                log.write("stop", self.step, {"reason": "max_time", "max_time": cfg.max_time,
                                              "seconds": round(budget.elapsed(), 3), "planned_steps": self.total_steps})
                progress.message(f"max_time {cfg.max_time} spent after {self.step} of {self.total_steps} steps: "
                                 "stopping to evaluate and save")
                return stopped_early, True
        return stopped_early, False

    def _log_step(self, loss: float, tokens: int, log: MetricsLog, progress: Progress) -> None:
        """Count the step's loss and tokens, show them, and every ``log_every`` steps write a "train" record."""
        self.window.append(loss)
        self.last_loss = loss
        self.tokens += tokens
        # the bar shows the loss that the next "train" record logs: the mean since the last one
        window_loss = sum(self.window) / len(self.window)
        line = progress.update(self.step, window_loss, float(self.scheduler.get_last_lr()[0]), tokens)
        if self.step % self.config.log_every == 0 or self.step == self.total_steps:
            log.write("train", self.step, {"loss": window_loss, "lr": self.scheduler.get_last_lr()[0],
                                           "tokens": self.tokens, **signal_statistics(self.signals)})
            if not progress.live:
                progress.message(line)
            self.window.clear()

    def _evaluate_during(self, log: MetricsLog, progress: Progress) -> bool:
        """An evaluation during training, logged and shown; True when early stopping says stop."""
        metrics = self.evaluate()
        log.write("eval", self.step, metrics)
        progress.message(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return self._record_eval(metrics)
