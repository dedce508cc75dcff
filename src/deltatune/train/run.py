"""A whole training run from options: data, task, model, adapter, trainer, report, run folder.

The run folder (``output_dir``) gets ``run.json``: the options and what the task learned (its
label set), so ``deltatune eval`` / ``predict`` / ``merge`` can rebuild exactly this model later.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import summary
from ..config import DeltaConfig
from ..errors import ConfigError, DataError
from ..hf import default_targets, load_tokenizer, models_on_meta, name_or_path, output_head_name
from ..inject import attach
from ..intrinsic import IntrinsicSubspace, enter_subspace
from ..state import set_active, state_of
from ..io import CONFIG_NAME, load
from ..quant import QuantConfig, quantize
from ..registry import RecipeInput, param_groups_for, recipe_named, training_hooks
from . import distributed, fsdp
from .config import TrainConfig
from .data import Rows, eval_split_of, read_rows, saved_splits, split_rows
from .lock import own_folder
from .option_use import ReadRecorder, refuse_unread
from .options import RunOptions, default_data_file, default_model_dir, split_options
from .prepare import trainable
from .tasks import Task, task_class
from .trainer import Trainer, TrainResult, planned_steps, seed_everything

RUN_FILE = "run.json"
TRAINED = "default"
"""The name of the adapter a run trains (saved at the root of its adapter folder, as peft saves "default")."""
Print = Callable[[str], None]


def spread(rows: Rows, limit: int) -> Rows:
    """At most ``limit`` rows taken at an even stride (files are often grouped by source)."""
    if not limit or len(rows.rows) <= limit:
        return rows
    stride = len(rows.rows) // limit
    return rows.subset(range(0, len(rows.rows), stride)[:limit])


def eval_source(run: RunOptions) -> str:
    """The file a run evaluates on: --eval-file, else the training file (its splits), else the shipped data."""
    return run.eval_file or run.train_file or default_data_file()


def load_data(run: RunOptions) -> tuple[Rows, Rows]:
    """Training and evaluation rows, from two files or from the splits of one file (or of one saved
    ``DatasetDict``: its --train-split, and its --eval-split, else "validation", unless --eval-file is given)."""
    train_file = run.train_file or default_data_file()
    if saved_splits(train_file):
        train = read_rows(train_file, run.skip_bad_rows, split=run.train_split)
        return train, spread(read_eval_rows(eval_source(run), run), run.max_eval_rows)
    everything = read_rows(train_file, run.skip_bad_rows)
    one_file = not run.eval_file
    has_splits = run.split_column in everything.rows[0]
    train = split_rows(everything, run.split_column, run.train_split) if has_splits else everything
    if one_file:
        if not has_splits:
            raise DataError(f"{train_file}: no --eval-file given and the rows have no {run.split_column!r} column to "
                            "split by; pass --eval-file, or --split-column naming the column that holds the split")
        evaluation = split_rows(everything, run.split_column, run.eval_split)
    else:
        evaluation = read_eval_rows(run.eval_file, run)
    return train, spread(evaluation, run.max_eval_rows)


def read_eval_rows(path: str, run: RunOptions) -> Rows:
    """The rows of an evaluation file, or of the evaluation split of a saved DatasetDict."""
    splits = saved_splits(path)
    return read_rows(path, run.skip_bad_rows, split=eval_split_of(splits, run.eval_split, path) if splits else "")


def adapter_config(run: RunOptions, task: Task, model: nn.Module, total_steps: int,
                   options: Mapping[str, Any] | None = None) -> DeltaConfig:
    """The adapter the options ask for (the method's registered recipe builds it from ``options``, by
    default the run's method options); the task's head is trained and saved with it. Adapters the
    recipe builds on must be loaded first (``load_prior``)."""
    targets: tuple[str, ...] | str | None = run.target_modules or None
    if targets == ("all-linear",):
        targets = "all-linear"
    common: dict[str, Any] = {"task_type": task.task_type,
                              "modules_to_save": (*run.modules_to_save, *task.saved_modules(model)) or None}
    return recipe_named(run.method).build(RecipeInput(run.method_options if options is None else options, targets, default_targets(model), common,
                                                      total_steps, name_or_path(model), run.own()))


def load_prior(run: RunOptions, model: nn.Module, options: Mapping[str, Any] | None = None) -> None:
    """Load, frozen, the saved adapters the method builds on (none for most methods)."""
    loads = recipe_named(run.method).loads
    chosen = run.method_options if options is None else options
    for name, folder in (loads(chosen) if loads is not None else {}).items():
        load(model, folder, name)


def attach_trained(model: nn.Module, config: DeltaConfig) -> None:
    """Attach the adapter the run trains, as ``TRAINED``, and compute with it (``active_form``)."""
    attach(model, config, TRAINED)
    set_active(model, config.active_form(TRAINED))


def prepare_base(run: RunOptions, task: Task, model: nn.Module) -> nn.Module:
    """The base as the run stores it: quantized to 4 bits for QLoRA (``--quantize``; int4_group in groups of
    ``--quant-group-size`` inputs), the trained modules kept dense."""
    if run.quantize == "none":
        return model
    head = output_head_name(model, task.task_type)
    keep = (*run.modules_to_save, *task.saved_modules(model), *([head] if head else []))
    return quantize(model, QuantConfig(quant_type=run.quantize, group_size=run.quant_group_size, skip_modules=keep))


def write_run_file(folder: Path, run: RunOptions, train: TrainConfig, model_path: str, task: Task) -> None:
    """run.json, written to a temporary file and renamed, so a failed write leaves the earlier one."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"model": model_path, "task_state": task.state(), "options": run.flat(), "train": asdict(train)}
    tmp = folder / f".{RUN_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / RUN_FILE)
    finally:
        tmp.unlink(missing_ok=True)


RUN_KEYS = {"model": str, "task_state": dict, "options": dict}


def read_run_file(folder: Path) -> dict[str, Any]:
    """The record of a finished run; a missing, corrupt or incomplete run.json is a DataError that says so."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        raise DataError(f"{folder} is not a deltatune run folder (no {RUN_FILE}); pass the --output-dir of a "
                        "`deltatune train` run")
    damaged = f"the run folder is damaged: train the run again (same --output-dir), or restore {RUN_FILE} from a copy"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}); {damaged}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.start}); {damaged}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}, not an object; {damaged}")
    for key, kind in RUN_KEYS.items():
        if not isinstance(data.get(key), kind):
            raise DataError(f"{path}: {key!r} is missing or not a JSON {'string' if kind is str else 'object'}; "
                            f"{damaged}")
    return data


def setup_device(run: RunOptions) -> torch.device:
    """The device (under torchrun: this rank's own GPU, ``cuda:LOCAL_RANK``, or the CPU)."""
    if run.threads:
        torch.set_num_threads(run.threads)
    return distributed.device_for(distributed.world_from_env(), run.device)


def train_run(run: RunOptions, train: TrainConfig, say: Print = print) -> TrainResult:
    """Train as the options say, printing what happens; returns the trainer's result.

    The output folder is locked first, so a second run on it is refused before any work; a run
    that fails before training starts leaves the folder as it was. Under torchrun every rank runs
    this; the process group lives for the call (torn down on error too), and only rank 0 locks the
    folder, writes run.json and prints.
    """
    device = setup_device(run)
    with distributed.process_group(device) as world:
        quiet: Print = lambda _: None  # noqa: E731
        with own_folder(Path(train.output_dir)) if world.main else contextlib.nullcontext():
            return _train_run(run, train, say if world.main else quiet, device, world)


def _train_run(run: RunOptions, train: TrainConfig, say: Print, device: torch.device,
               world: distributed.World) -> TrainResult:
    seed_everything(train.seed)
    model_path = run.model or default_model_dir()
    train_rows, eval_rows = load_data(run)
    task = task_class(run.task)(load_tokenizer(model_path), run.max_length, run.column_map())
    train_rows, eval_rows = task.usable(train_rows, run.skip_bad_rows), task.usable(eval_rows, run.skip_bad_rows)
    for rows in (train_rows, eval_rows):
        if rows.skipped:
            say(f"skipped {len(rows.skipped)} bad line(s) in {rows.source}, first at {rows.skipped[0]}")
    task.fit(train_rows)
    train_features, eval_features = task.encode(train_rows), task.encode(eval_rows)
    say(f"data: {len(train_features)} training rows ({train_rows.source}), "
        f"{len(eval_features)} evaluation rows ({eval_rows.source})")
    meta = meta_init(run, train, world)
    model = prepare_base(run, task, load_base(task, model_path, device, meta and not world.main))
    options = ReadRecorder(run.method_options)  # what the method reads of them, checked below
    load_prior(run, model, options)
    attach_trained(model, adapter_config(run, task, model, planned_steps(len(train_features), train, world.size),
                                         options))
    say(summary(model))
    callbacks, loss_terms = training_hooks(run.method, model)
    space = enter_intrinsic(run, train, model, say)
    callbacks = [*callbacks, *([space.after_step] if space else [])]  # checkpoints and saves see theta
    if meta:  # the ranks on meta receive their shards from rank 0 (the trainer then takes the model as sharded)
        fsdp.shard(model, trainable(model), train.bf16, device)
    trainer = Trainer(model, task, train_features, eval_features, train, callbacks=callbacks, loss_terms=loss_terms,
                      param_groups=param_groups_for(run.method, options))
    refuse_unread(run.method, options)  # the optimizer's groups have read theirs; nothing is written yet
    if not run.resume and run.initial_eval:
        before = trainer.evaluate()
        say("before training: " + _format(before))
    if world.main:
        write_run_file(Path(train.output_dir), run, train, model_path, task)  # only now: all checks have passed
    processes = f" x {world.size} processes" if world.distributed else ""
    say(f"training {trainer.total_steps} steps: batch {train.batch_size} x {train.grad_accum}{processes}, "
        f"lr {train.lr}, {train.schedule} schedule, {torch.get_num_threads()} threads, {device}")
    result = trainer.fit(resume=run.resume)
    if result.out_of_time:
        say(f"max_time {train.max_time} spent: stopped after {result.steps} of {trainer.total_steps} steps")
    say("after training: " + _format(result.metrics))
    if space is not None:
        space.bake()
        result.metrics.update(space.record())  # d and D, for a sweep over d (intrinsic.d90)
    say(f"adapter saved to {result.adapter_dir} (peft format); metrics log: {Path(train.output_dir) / 'metrics.jsonl'}")
    return result


def meta_init(run: RunOptions, train: TrainConfig, world: distributed.World) -> bool:
    """Whether only rank 0 loads the weights (``--fsdp`` under torchrun): the other ranks build the model on the
    meta device and receive just their shards (fsdp.py). Not with a 4-bit base, whose packed weights every rank
    keeps whole anyway, nor with --intrinsic-dim, whose subspace is set up on the whole model before the
    trainer shards it."""
    return train.fsdp and world.distributed and run.quantize == "none" and not run.intrinsic_dim


def load_base(task: Task, model_path: str, device: torch.device, on_meta: bool) -> nn.Module:
    """The task's pretrained model on ``device``, or (``on_meta``) its architecture on the meta device."""
    if on_meta:
        with models_on_meta():
            return task.load_model(model_path)
    return task.load_model(model_path).to(device)


def enter_intrinsic(run: RunOptions, train: TrainConfig, model: nn.Module, say: Print) -> IntrinsicSubspace | None:
    """With --intrinsic-dim, the trainable parameters train in a random subspace (docs/intrinsic_dimension.md)."""
    if not run.intrinsic_dim:
        return None
    # a checkpoint holds theta, not z; a recomputed forward would not see theta (it runs outside the forward hooks)
    for name, value in (("resume", run.resume), ("gradient_checkpointing", train.gradient_checkpointing)):
        if value:
            raise ConfigError("options", name, value, "cannot be combined with --intrinsic-dim",
                              f"drop --{name.replace('_', '-')} or --intrinsic-dim")
    space = enter_subspace(model, run.intrinsic_dim, run.projection, run.intrinsic_seed, run.said)
    say(f"intrinsic subspace: d={space.dim} of D={space.total} trainable values, {run.projection} projection "
        f"(seed {run.intrinsic_seed}){', SAID scales' if run.said else ''}")
    return space


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "(no evaluation data)"


def rebuild(run_dir: Path, adapter: str = "adapter", threads: int = 0) -> tuple[nn.Module, Task, RunOptions]:
    """The model of a finished run with its trained adapter loaded, and its task; ``threads``: torch CPU
    threads for this use (0 = torch's default; not the count the run trained with)."""
    record = read_run_file(run_dir)
    run, _ = split_options(record["options"])
    run = replace(run, threads=threads)
    device = setup_device(run)
    task = task_class(run.task)(load_tokenizer(record["model"]), run.max_length, run.column_map(), record["task_state"])
    model = prepare_base(run, task, task.load_model(record["model"]))
    load_saved(model, run_dir / adapter)
    return model.to(device).eval(), task, run


def load_saved(model: nn.Module, folder: Path) -> None:
    """Load what a run saved: the adapters its own builds on (subfolders, by name) first, then its
    own (the folder itself), computed with as in training."""
    for sub in sorted(p for p in folder.iterdir() if (p / CONFIG_NAME).is_file()):
        load(model, sub, sub.name)
    load(model, folder, TRAINED)
    set_active(model, state_of(model).require(TRAINED).active_form(TRAINED))
