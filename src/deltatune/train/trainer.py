"""The training loop: batches, loss, optimizer, schedule, evaluation, checkpoints and resume.

The data order is a pure function of (seed, epoch, position): epoch ``e`` visits the training
features in the order of ``randperm(n)`` drawn from a generator seeded with ``seed + e``, and
only whole micro-batches are used. Together with the optimizer, scheduler and random-generator
states stored in a checkpoint, this is what makes 10 steps + resume + 10 steps give the same
adapter as 20 straight steps. The checkpoint also keeps the running counters of the log (tokens
seen, the losses since the last log line, how many log records there were), so a resumed run's
``metrics.jsonl`` reads as one run.

Divergence is checked on every step, not only on the loss, so that nothing is ever saved from a
broken state. A step stops the run (TrainingError) when

* the loss of a micro-batch is NaN/inf, or the gradient norm is: the update is not applied;
* after the update, a trainable parameter is NaN/inf, their joint L2 norm grew by more than
  ``max_norm_growth`` (default 10x; a norm below 1 counts as 1) in this one step, or a
  trainable value exceeds ``max_param_value`` in magnitude (default 1e4): the update is in the
  model in memory, but no checkpoint, ``best/`` or final adapter is written from it.

The checks run before the step is counted or saved, so every checkpoint on disk passed them.
"""

from __future__ import annotations

import math
import random
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from ..errors import AdapterError, TrainingError
from ..fast import accelerate, retain_freed_memory
from ..io import save
from ..layer import STATE_ATTR
from .checkpoint import latest_checkpoint, read_trainer_state, restore_adapters, rng_state, set_rng_state, write_checkpoint
from .config import TrainConfig
from .lock import own_folder
from .progress import MetricsLog, Progress, rewind_log
from .schedule import make_scheduler
from .tasks.base import Batch, Features, Task, tokens_in

StepCallback = Callable[[int], None]
"""Called with the global step after each optimizer step, before gradients are cleared."""

LossTerm = Callable[[], Tensor]
"""A scalar added to every micro-batch's loss (e.g. a regulariser on the adapter's parameters)."""


def planned_steps(num_examples: int, config: TrainConfig) -> int:
    """The optimizer steps a run of ``config`` makes over ``num_examples`` training examples."""
    micro_batches_per_epoch = num_examples // config.batch_size
    if micro_batches_per_epoch == 0:
        raise TrainingError(f"{num_examples} training examples are fewer than one batch of "
                            f"{config.batch_size}; lower --batch-size or add data")
    steps_per_epoch = max(1, micro_batches_per_epoch // config.grad_accum)
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


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


class MicroBatches:
    """Micro-batch ``k`` of the endless, epoch-by-epoch shuffled stream of training features."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // batch_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> list[int]:
        epoch, position = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        start = position * self.batch_size
        return self._order[start:start + self.batch_size].tolist()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train, in the model's order (a stable order for optimizer state)."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def parameter_stats(params: Sequence[Tensor]) -> tuple[float, float]:
    """(joint L2 norm, largest magnitude) of ``params``, in fp32, with one device sync; NaN/inf propagate."""
    params = [p for p in params if p.numel()]  # the max of an empty tensor is undefined
    if not params:
        return 0.0, 0.0
    device = params[0].device
    norms = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32).to(device) for p in params])
    peaks = torch.stack([torch.linalg.vector_norm(p, ord=math.inf, dtype=torch.float32).to(device) for p in params])
    norm, peak = torch.stack([torch.linalg.vector_norm(norms), peaks.max()]).tolist()
    return norm, peak


def gradient_norm(params: Sequence[Tensor]) -> float:
    """The joint L2 norm of the gradients that exist (0.0 when there are none)."""
    return parameter_stats([p.grad for p in params if p.grad is not None])[0]


def divergence(before: float, after: float, peak: float, config: TrainConfig) -> str:
    """Why parameters of norm ``after`` (``before`` one step earlier) and largest magnitude ``peak`` have
    diverged, or "" when they have not. See the module docstring for the criterion."""
    if not math.isfinite(peak):  # the largest magnitude: the norm may overflow to inf while every value is finite
        return f"a trainable parameter became {peak}"
    growth = config.max_norm_growth
    if growth and after > growth * max(before, 1.0):
        return (f"the trainable parameters' norm grew more than max_norm_growth={growth:g}x in one update "
                f"(from {before:.4g} to {after:.4g})")
    if config.max_param_value and peak > config.max_param_value:
        return (f"a trainable parameter exceeded max_param_value={config.max_param_value:g} in magnitude "
                f"(reached {peak:.4g})")
    return ""


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fp32 or blockwise 8-bit states, ``config.optimizer``) over the trainable parameters."""
    params = trainable(model)
    if not params:
        raise TrainingError("the model has no trainable parameters: attach an adapter first (dt.attach)")
    if config.optimizer == "adamw8bit":
        from ..quant.optim import AdamW8bit

        return AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation so that it works with a frozen base.

    With the base frozen no input of a checkpointed block requires grad, and reentrant
    checkpointing then drops the adapter gradients ("element 0 of tensors does not require
    grad"). Making the embedding output require grad fixes that for either checkpoint flavour.
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TrainingError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                            "gradient checkpointing is supported on transformers models")
    enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    make_inputs_require_grad = getattr(model, "enable_input_require_grads", None)
    if make_inputs_require_grad is not None:
        make_inputs_require_grad()


def refuse_checkpointing(model: nn.Module) -> None:
    """Stop, before anything is written, when an active adapter cannot train with gradient checkpointing."""
    state = model.__dict__.get(STATE_ATTR)
    refusing = [n for n in state.active if not state.configs[n].trains_with_checkpointing()] if state else []
    if refusing:
        raise AdapterError(f"adapter(s) {refusing} cannot train with gradient checkpointing (every layer's recomputation "
                           "would see the state the adapter handed it once more); drop --gradient-checkpointing "
                           "(TrainConfig.gradient_checkpointing=False)")


class Trainer:
    """Train a delta-tuned model on a task; evaluate, checkpoint and resume."""

    def __init__(self, model: nn.Module, task: Task, train_features: Sequence[Features],
                 eval_features: Sequence[Features] = (), config: TrainConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, callbacks: Sequence[StepCallback] = (),
                 loss_terms: Sequence[LossTerm] = ()) -> None:
        self.model, self.task, self.config = model, task, config or TrainConfig()
        self.train_features, self.eval_features = list(train_features), list(eval_features)
        cfg = self.config
        self.total_steps = planned_steps(len(self.train_features), cfg)
        self.stream = MicroBatches(len(self.train_features), cfg.batch_size, cfg.seed)
        self.optimizer = optimizer or make_optimizer(model, cfg)
        self.params = trainable(model)
        self.device = self.params[0].device  # batches go where the adapter lives
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, self.total_steps, cfg.warmup_ratio)
        self.callbacks, self.loss_terms = list(callbacks), list(loss_terms)
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
        if cfg.gradient_checkpointing:  # checked first: nothing has changed the model yet
            refuse_checkpointing(model)
        if cfg.accelerate:  # it refuses an unsupported model before anything changes it
            accelerate(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.retain_freed_memory and not retain_freed_memory():
            warnings.warn("retain_freed_memory needs glibc (Linux); the allocator is left as it is",
                          stacklevel=2)

    # -- state ---------------------------------------------------------------------------
    def state(self, log_records: int | None = None) -> dict[str, Any]:
        """What a checkpoint stores besides the adapters; ``log_records``: the lines metrics.jsonl holds
        (None: unknown, then a resume cuts the log at the step instead)."""
        return {"step": self.step, "micro_batches": self.step * self.config.grad_accum,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "best": self.best, "evals_without_improvement": self.evals_without_improvement, "rng": rng_state(),
                "tokens": self.tokens, "loss_window": list(self.window), "last_loss": self.last_loss,
                "log_records": log_records}

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``output_dir``; False when there is none."""
        folder = latest_checkpoint(self.output / "checkpoints")
        if folder is None:
            return False
        state = read_trainer_state(folder)
        restore_adapters(self.model, folder)
        self.optimizer.load_state_dict(state["optimizer"])
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
        self._check_resumed(folder)
        return True

    def _check_resumed(self, folder: Path) -> None:
        """A checkpoint written before divergence was checked on every step may hold broken weights."""
        norm, peak = parameter_stats(self.params)
        why = divergence(norm, norm, peak, self.config)
        if why:
            raise TrainingError(f"{folder} is not a good checkpoint: {why}. Resume from an earlier one (write its "
                                f"name into {folder.parent / 'latest'}), or start afresh without --resume")

    # -- one step ------------------------------------------------------------------------
    def _batch(self, k: int) -> Batch:
        batch = self.task.collate([self.train_features[i] for i in self.stream.indices(k)])
        return {key: value.to(self.device) for key, value in batch.items()}

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens)."""
        cfg, losses, tokens = self.config, [], 0
        for micro in range(cfg.grad_accum):
            batch = self._batch(self.step * cfg.grad_accum + micro)
            tokens += tokens_in(batch)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = self.task.loss(self.model, batch)
                for term in self.loss_terms:
                    loss = loss + term()
            value = float(loss.detach())  # detached: a scalar of a graph tensor warns, and needs no graph
            if not math.isfinite(value):
                self._stop(f"the training loss became {value}", applied=False)
            (loss / cfg.grad_accum).backward()
            losses.append(value)
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
        if self.config.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        else:
            norm = gradient_norm(self.params)
        if not math.isfinite(norm):
            self._stop(f"the gradient norm became {norm}", applied=False)

    def _check_update(self) -> None:
        """Stop if the update just applied diverged (see the module docstring); else remember the new norm."""
        norm, peak = parameter_stats(self.params)
        why = divergence(self.param_norm, norm, peak, self.config)
        if why:
            self._stop(why, applied=True)
        self.param_norm = norm

    def _stop(self, why: str, applied: bool) -> NoReturn:
        """Raise the TrainingError of a diverged step, naming it and the last checkpoint (all on disk are good)."""
        self.optimizer.zero_grad(set_to_none=True)
        latest = latest_checkpoint(self.output / "checkpoints")
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        done = ("the update is in the model in memory, but nothing was saved from it" if applied
                else "the update was not applied")
        raise TrainingError(f"{why} at step {self.step + 1}; {done} and training stopped ({kept}). "
                            "Try a lower --lr, --max-grad-norm 1.0, or fp32 instead of --bf16.")

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the evaluation features (empty when there are none)."""
        if not self.eval_features:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                return self.task.evaluate(self.model, self.eval_features, self.config.eval_batch_size)
        finally:
            self.model.train(was_training)

    def _record_eval(self, metrics: dict[str, float]) -> bool:
        """Track the best metric (saving that adapter); True when early stopping says stop."""
        value = metrics.get(self.task.metric)
        if value is None:
            return False
        if self.best is None or value > self.best:
            self.best, self.evals_without_improvement = value, 0
            save(self.model, self.output / "best")
            return False
        self.evals_without_improvement += 1
        return 0 < self.config.early_stopping <= self.evals_without_improvement

    def _resume_log(self) -> MetricsLog:
        """The metrics log, cut back to what it held at the checkpoint resumed from."""
        cfg = self.config
        path = self.output / "metrics.jsonl"
        records = rewind_log(path, self.log_records, self.step)
        return MetricsLog(path, self.output / "tensorboard" if cfg.tensorboard else None, records,
                          purge_step=self.step + 1)

    def _clear_earlier_run(self) -> bool:
        """A fresh run must not leave an earlier run's checkpoints for a later --resume to pick up."""
        stale = [p for p in (self.output / "checkpoints", self.output / "metrics.jsonl") if p.exists()]
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return bool(stale)

    # -- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``total_steps`` (or until early stopping); save the final adapter.

        The output folder is locked for the whole call: a second run on it (another process)
        is refused with a ConfigError before it changes anything.
        """
        with own_folder(self.output):
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        cfg = self.config
        resumed = resume and self.resume()
        progress = Progress(self.total_steps, self.step, cfg.progress)
        if resumed:
            progress.message(f"resumed from step {self.step} ({self.output / 'checkpoints'})")
            log = self._resume_log()
        else:
            if self._clear_earlier_run():
                progress.message(f"{self.output}: removed the checkpoints and metrics of an earlier run (fresh start; "
                                 "pass resume=True / --resume to continue a run instead)")
            log = MetricsLog(self.output / "metrics.jsonl", self.output / "tensorboard" if cfg.tensorboard else None)
        self.param_norm = parameter_stats(self.params)[0]
        self.model.train()
        stopped_early, metrics = False, {}
        try:
            while self.step < self.total_steps and not stopped_early:
                loss, tokens = self._train_step()
                self.window.append(loss)
                self.last_loss = loss
                self.tokens += tokens
                line = progress.update(self.step, loss, float(self.scheduler.get_last_lr()[0]), tokens)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    log.write("train", self.step, {"loss": sum(self.window) / len(self.window),
                                                   "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens})
                    if not progress.live:
                        progress.message(line)
                    self.window.clear()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    metrics = self.evaluate()
                    log.write("eval", self.step, metrics)
                    progress.message(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    stopped_early = self._record_eval(metrics)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    write_checkpoint(self.output / "checkpoints", self.model, self.state(log.records),
                                     {"step": self.step, "loss": loss}, cfg.keep_checkpoints)
        finally:
            progress.close()
        metrics = self.evaluate()
        if metrics:
            log.write("eval", self.step, metrics)
            self._record_eval(metrics)
        log.close()
        adapter_dir = save(self.model, self.output / "adapter")
        return TrainResult(self.step, self.last_loss, metrics, self.best, stopped_early, adapter_dir)
