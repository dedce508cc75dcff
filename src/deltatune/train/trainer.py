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

Under torchrun (``WORLD_SIZE`` > 1) the run is data parallel (see ``distributed.py``): global
micro-batch ``k`` is the 1-process micro-batch of ``batch_size x world size`` rows, and rank ``r``
takes its ``r``-th slice of ``batch_size`` rows. Each rank scales its loss by its share of the
global loss terms (rows, or labelled tokens: ``Task.loss_weight``), and the adapter gradients are
averaged once per optimizer step (none on the other micro-batches of an accumulation), so an
N-process run computes the update of a 1-process run with N times the micro-batch. Every rank
then holds the same adapter; each rank evaluates its slice of the evaluation rows and the per-row
outputs are gathered (``eval_shard.py``); rank 0 alone writes the log, checkpoints, ``best/``, the
adapter and the progress display.

With ``TrainConfig.fsdp`` the model is sharded with FSDP2 instead (see ``fsdp.py``): the same data order
and loss weighting, FSDP2 averages the gradients, every rank evaluates its slice (in as many forward
passes as every other rank) and joins every gather of the adapter (saves, checkpoints), and rank 0
writes the same files.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import AdapterError, TrainingError
from ..fast import accelerate, retain_freed_memory
from ..io import gathered, save
from ..layer import ADAPTER_PARTS, STATE_ATTR
from ..state import unwrap
from . import distributed, eval_shard, fsdp
from .checkpoint import latest_checkpoint, read_trainer_state, restore_adapters, rng_state, set_rng_state, write_checkpoint
from .config import TrainConfig
from .lock import own_folder
from .progress import MetricsLog, Progress, rewind_log
from .schedule import make_scheduler
from .stream import FeatureStream, StreamBatches, streamed_steps
from .tasks.base import Batch, Features, Task, tokens_in

StepCallback = Callable[[int], None]
"""Called with the global step after each optimizer step, before gradients are cleared."""

LossTerm = Callable[[], Tensor]
"""A scalar added to every micro-batch's loss (e.g. a regulariser on the adapter's parameters)."""


@runtime_checkable
class TrainingSignals(Protocol):
    """A module of the model that reports to the trainer from inside the forward (a token router's
    load-balancing loss and load statistics): each method returns what was recorded since its last
    call. The trainer adds ``take_loss()`` to each micro-batch's loss and ``take_statistics()`` to the
    "train" records of metrics.jsonl; it finds these modules itself, so no method is named here."""

    def take_loss(self) -> Tensor | None: ...

    def take_statistics(self) -> dict[str, float]: ...


def planned_steps(num_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    """The optimizer steps a run of ``config`` makes over ``num_examples`` training examples
    (on ``world_size`` processes, each micro-batch takes ``batch_size`` rows per process)."""
    rows = config.batch_size * world_size
    micro_batches_per_epoch = num_examples // rows
    if micro_batches_per_epoch == 0:
        across = f" ({config.batch_size} per process x {world_size} processes)" if world_size > 1 else ""
        raise TrainingError(f"{num_examples} training examples are fewer than one batch of "
                            f"{rows}{across}; lower --batch-size or add data")
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


class MicroBatches:
    """Micro-batch ``k`` of the endless, epoch-by-epoch shuffled stream of training features.

    With ``world`` processes the stream is the one of a single process with ``batch_size x world.size``
    rows per micro-batch, and this rank's micro-batch ``k`` is its ``world.rank``-th slice of it: the
    ranks together see exactly the rows of that single process, in the same steps.
    """

    def __init__(self, size: int, batch_size: int, seed: int, world: distributed.World | None = None) -> None:
        self.world = world or distributed.World()
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // (batch_size * self.world.size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> list[int]:
        epoch, position = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        start = (position * self.world.size + self.world.rank) * self.batch_size
        return self._order[start:start + self.batch_size].tolist()


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


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train, in the model's order (a stable order for optimizer state)."""
    return [p for p in model.parameters() if p.requires_grad]


def base_parameters(model: nn.Module) -> int:
    """How many parameters the model has outside its adapters' own modules (each shared one once)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not any(part in ADAPTER_PARTS for part in name.split(".")[:-1]))


@torch.no_grad()
def parameter_stats(params: Sequence[Tensor]) -> tuple[float, float]:
    """(joint L2 norm, largest magnitude) of ``params``, in fp32, with one device sync; NaN/inf propagate."""
    params = [p for p in params if p.numel()]  # the max of an empty tensor is undefined
    if not params:
        return 0.0, 0.0
    device = params[0].device
    # a sharded (DTensor) parameter's norm is reduced over the ranks: ``gathered`` makes it a plain tensor
    norms = torch.stack([gathered(torch.linalg.vector_norm(p, dtype=torch.float32)).to(device) for p in params])
    peaks = torch.stack([gathered(torch.linalg.vector_norm(p, ord=math.inf, dtype=torch.float32)).to(device)
                         for p in params])
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

    def __init__(self, model: nn.Module, task: Task, train_features: Sequence[Features] | FeatureStream,
                 eval_features: Sequence[Features] = (), config: TrainConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, callbacks: Sequence[StepCallback] = (),
                 loss_terms: Sequence[LossTerm] = ()) -> None:
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
        if cfg.fsdp:  # before the optimizer, which must hold the sharded parameters
            if optimizer is not None:
                raise TrainingError("with --fsdp the trainer shards the model and then builds the optimizer; "
                                    "do not pass an optimizer (or shard the model yourself, without --fsdp)")
            fsdp.shard(model, trainable(model), cfg.bf16)
        self.sharded = fsdp.is_sharded(model)
        self.optimizer = optimizer or make_optimizer(model, cfg)
        self.params = trainable(model)
        if isinstance(self.train_features, FeatureStream):
            self.total_steps = streamed_steps(cfg.max_steps)
            self.stream: MicroBatches | StreamBatches = StreamBatches(self.train_features, cfg.batch_size, self.world)
        else:
            self.total_steps = planned_steps(len(self.train_features), cfg, self.world.size)
            self.stream = MicroBatches(len(self.train_features), cfg.batch_size, cfg.seed, self.world)
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, self.total_steps, cfg.warmup_ratio)
        self.callbacks, self.loss_terms = list(callbacks), list(loss_terms)
        self.signals = [m for m in model.modules() if isinstance(m, TrainingSignals)]
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
        (None: unknown, then a resume cuts the log at the step instead). Sharded, every rank must call it."""
        optimizer = self.optimizer.state_dict()
        if self.sharded:  # stored whole, as one process stores it
            optimizer = fsdp.gather_optimizer_state(self.optimizer, optimizer)
        return {"step": self.step, "micro_batches": self.step * self.config.grad_accum,
                "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
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
        self._check_same_batches(state, folder)
        with fsdp.whole_trainables(self.model, write_back=True) if self.sharded else contextlib.nullcontext():
            restore_adapters(self.model, folder)  # sharded: into whole copies, whose slices go back to the shards
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sharded:
            fsdp.shard_optimizer_state(self.optimizer)
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

    def _checkpoint(self, log_records: int, loss: float) -> None:
        """Rank 0 writes a checkpoint; sharded, every rank first gathers the adapter and optimizer states."""
        if not (self.world.main or self.sharded):
            return
        with fsdp.whole_trainables(self.model) if self.sharded else contextlib.nullcontext():
            state = self.state(log_records)
            if self.world.main:
                write_checkpoint(self.output / "checkpoints", self.model, state,
                                 {"step": self.step, "loss": loss}, self.config.keep_checkpoints)

    def _check_same_batches(self, state: dict[str, Any], folder: Path) -> None:
        """The data position of a checkpoint means the same rows only with the same global micro-batch
        (batch size x processes): 2 processes x 4 rows may resume as 1 x 8, not as 2 x 8."""
        stored = state.get("global_micro_batch")  # absent from older (one-process) checkpoints
        here = self.config.batch_size * self.world.size
        if stored is not None and int(stored) != here:
            raise TrainingError(f"{folder} was written by a run with {state.get('world_size', 1)} process(es) x "
                                f"{int(stored) // int(state.get('world_size', 1))} rows per micro-batch; this run has "
                                f"{self.world.size} x {self.config.batch_size}. Resume with a batch size and number of "
                                f"processes whose product is {stored}")

    def _check_resumed(self, folder: Path) -> None:
        """A checkpoint written before divergence was checked on every step may hold broken weights."""
        norm, peak = parameter_stats(self.params)
        why = divergence(norm, norm, peak, self.config)
        if why:
            raise TrainingError(f"{folder} is not a good checkpoint: {why}. Resume from an earlier one (write its "
                                f"name into {folder.parent / 'latest'}), or start afresh without --resume")

    # -- one step ------------------------------------------------------------------------
    def _batch(self, k: int) -> Batch:
        if isinstance(self.stream, StreamBatches):
            batch = self.task.collate(self.stream.batch(k))
        else:  # listed features (only a FeatureStream comes with StreamBatches)
            listed = cast(list[Features], self.train_features)
            batch = self.task.collate([listed[i] for i in self.stream.indices(k)])
        return {key: value.to(self.device) for key, value in batch.items()}

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens), over all ranks."""
        cfg, losses, tokens = self.config, [], 0
        for micro in range(cfg.grad_accum):
            fsdp.set_gradient_sync(self.model, micro == cfg.grad_accum - 1)  # FSDP2 reduces in backward
            batch = self._batch(self.step * cfg.grad_accum + micro)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                self._signal_loss()  # dropped: recorded by forwards outside this micro-batch
                loss = self.task.loss(self.model, batch)
                for term in self.loss_terms:
                    loss = loss + term()
                signalled = self._signal_loss()
                loss = loss if signalled is None else loss + signalled
            value = float(loss.detach())  # detached: a scalar of a graph tensor warns, and needs no graph
            value, share, counted = self._global_loss(value, batch)
            if not math.isfinite(value):  # the global value: every rank stops together, none waits for another
                self._stop(f"the training loss became {value}", applied=False)
            if share:  # a rank whose rows hold no loss terms has nothing to add (and its own mean is 0/0)
                (loss * share / cfg.grad_accum).backward()
            losses.append(value)
            tokens += counted
        if not self.sharded:  # FSDP2 reduce-scattered (averaged) them in the last backward
            distributed.all_reduce_mean(self.params)  # once per step: accumulation needs no traffic in between
        self._clip_and_check_gradients()
        self.optimizer.step()
        self._check_update()
        self.scheduler.step()
        self.step += 1
        for callback in self.callbacks:
            callback(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), tokens

    def _signal_loss(self) -> Tensor | None:
        """The sum of what the model's ``TrainingSignals`` recorded for the loss since the last call."""
        taken = [t for t in (s.take_loss() for s in self.signals) if t is not None]
        return sum(taken[1:], taken[0]) if taken else None

    def _signal_statistics(self) -> dict[str, float]:
        return {k: v for s in self.signals for k, v in s.take_statistics().items()}

    def _global_loss(self, value: float, batch: Batch) -> tuple[float, float, int]:
        """(the loss of the global micro-batch, this rank's loss scale, the global micro-batch's tokens).

        The global loss averages all ranks' loss terms (rows, or labelled tokens), so this rank's share
        is its terms over all terms; times the world size, since the gradient sync averages over ranks.
        """
        tokens = tokens_in(batch)
        if not self.world.distributed:
            return value, 1.0, tokens
        weight = self.task.loss_weight(batch)
        weighted = value * weight if weight else 0.0
        total_weight, total_loss, total_tokens = distributed.all_reduce_sum([weight, weighted, tokens], self.device)
        if total_weight == 0:
            return math.nan, 0.0, int(total_tokens)
        return total_loss / total_weight, weight * self.world.size / total_weight, int(total_tokens)

    def _clip_and_check_gradients(self) -> None:
        """Clip to ``max_grad_norm``; a NaN/inf gradient norm stops before the update is applied."""
        if self.config.max_grad_norm > 0:
            norm = float(gathered(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)))
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

    def _time_spent(self, started: float) -> bool:
        """Whether ``max_time`` has run out (every rank takes rank 0's answer, so all stop at the same step)."""
        budget = self.config.max_seconds
        if not budget:
            return False
        return bool(distributed.broadcast_object(time.perf_counter() - started >= budget))

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
            if self.world.main or self.sharded:  # sharded: every rank gathers, rank 0 writes
                save(self.model, self.output / "best")
            return False
        self.evals_without_improvement += 1
        return 0 < self.config.early_stopping <= self.evals_without_improvement

    def _resume_log(self) -> MetricsLog:
        """The metrics log, cut back to what it held at the checkpoint resumed from."""
        cfg = self.config
        path = self.output / "metrics.jsonl"
        if not self.world.main:
            return SilentLog(self.log_records or 0)
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
        progress = Progress(self.total_steps, self.step, cfg.progress, None if self.world.main else Discard())
        if resumed:
            progress.message(f"resumed from step {self.step} ({self.output / 'checkpoints'})")
            log = self._resume_log()
        elif not self.world.main:
            log = SilentLog()
        else:
            if self._clear_earlier_run():
                progress.message(f"{self.output}: removed the checkpoints and metrics of an earlier run (fresh start; "
                                 "pass resume=True / --resume to continue a run instead)")
            log = MetricsLog(self.output / "metrics.jsonl", self.output / "tensorboard" if cfg.tensorboard else None)
        if not self.sharded:  # fsdp.shard made them equal before sharding
            distributed.broadcast_parameters(self.params)  # identical adapters on every rank, however they were built
        self.param_norm = parameter_stats(self.params)[0]
        self.model.train()
        stopped_early, out_of_time, metrics = False, False, {}
        started = time.perf_counter()
        try:
            while self.step < self.total_steps and not stopped_early:
                loss, tokens = self._train_step()
                self.window.append(loss)
                self.last_loss = loss
                self.tokens += tokens
                # the bar shows the loss that the next "train" record logs: the mean since the last one
                window_loss = sum(self.window) / len(self.window)
                line = progress.update(self.step, window_loss, float(self.scheduler.get_last_lr()[0]), tokens)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    log.write("train", self.step, {"loss": window_loss,
                                                   "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens,
                                                   **self._signal_statistics()})
                    if not progress.live:
                        progress.message(line)
                    self.window.clear()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    metrics = self.evaluate()
                    log.write("eval", self.step, metrics)
                    progress.message(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    stopped_early = self._record_eval(metrics)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._checkpoint(log.records, loss)
                if self._time_spent(started):
                    out_of_time = True
                    log.write("stop", self.step, {"reason": "max_time", "max_time": cfg.max_time,
                                                  "seconds": round(time.perf_counter() - started, 3),
                                                  "planned_steps": self.total_steps})
                    progress.message(f"max_time {cfg.max_time} spent after {self.step} of {self.total_steps} steps: "
                                     "stopping to evaluate and save")
                    break
        finally:
            progress.close()
        seconds = time.perf_counter() - started
        metrics = self.evaluate()
        if metrics:
            log.write("eval", self.step, metrics)
            self._record_eval(metrics)
        log.close()
        writes = self.world.main or self.sharded  # sharded: every rank gathers, rank 0 writes
        adapter_dir = save(self.model, self.output / "adapter") if writes else self.output / "adapter"
        distributed.barrier()  # when fit returns on any rank, the adapter is on disk
        return TrainResult(self.step, self.last_loss, metrics, self.best, stopped_early, adapter_dir, self.tokens, seconds,
                           sum(p.numel() for p in self.params), base_parameters(self.model), out_of_time)
