"""A whole training run from options: data, task, model, adapter, trainer, report, run folder.

The run folder (``output_dir``) gets ``run.json``: the options and what the task learned (its
label set), so ``deltatune eval`` / ``predict`` / ``merge`` can rebuild exactly this model later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hf
from ..adapters import summary
from ..config import DeltaConfig
from ..errors import DataError
from ..inject import attach
from ..io import load
from ..methods.ia3 import IA3Config
from ..methods.lora import LoraConfig
from .config import TrainConfig
from .data import Rows, read_rows, split_rows
from .options import RunOptions, default_data_file, default_model_dir, split_options
from .tasks import Task, task_class
from .trainer import Trainer, TrainResult, seed_everything

RUN_FILE = "run.json"
Print = Callable[[str], None]


def load_tokenizer(model_path: str) -> Any:
    """The model's tokenizer, offline."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf.quiet_transformers()  # the load report lists the new head as "MISSING": expected here
    return hf.transformers_class("AutoTokenizer").from_pretrained(model_path, local_files_only=True)


def spread(rows: Rows, limit: int) -> Rows:
    """At most ``limit`` rows taken at an even stride (files are often grouped by source)."""
    if not limit or len(rows.rows) <= limit:
        return rows
    stride = len(rows.rows) // limit
    return Rows(rows.rows[::stride][:limit], rows.source, rows.skipped)


def load_data(run: RunOptions) -> tuple[Rows, Rows]:
    """Training and evaluation rows, from two files or from the splits of one file."""
    train_file = run.train_file or default_data_file()
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
        evaluation = read_rows(run.eval_file, run.skip_bad_rows)
    return train, spread(evaluation, run.max_eval_rows)


def adapter_config(run: RunOptions, task: Task, model: nn.Module) -> DeltaConfig:
    """The adapter the options ask for; the task's head is trained and saved with it."""
    targets: tuple[str, ...] | str | None = run.target_modules or None
    if targets == ("all-linear",):
        targets = "all-linear"
    saved = (*run.modules_to_save, *task.saved_modules(model)) or None
    if run.method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=run.feedforward_modules,
                         modules_to_save=saved, task_type=task.task_type)
    return LoraConfig(r=run.r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout, use_rslora=run.use_rslora,
                      target_modules=targets, modules_to_save=saved, task_type=task.task_type,
                      use_dora=run.method == "dora")


def write_run_file(folder: Path, run: RunOptions, train: TrainConfig, model_path: str, task: Task) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"model": model_path, "task_state": task.state(), "options": asdict(run), "train": asdict(train)}
    (folder / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_run_file(folder: Path) -> dict[str, Any]:
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        raise DataError(f"{folder} is not a deltatune run folder (no {RUN_FILE}); pass the --output-dir of a "
                        "`deltatune train` run")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def setup_device(run: RunOptions) -> torch.device:
    if run.threads:
        torch.set_num_threads(run.threads)
    return torch.device(run.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def train_run(run: RunOptions, train: TrainConfig, say: Print = print) -> TrainResult:
    """Train as the options say, printing what happens; returns the trainer's result."""
    device = setup_device(run)
    seed_everything(train.seed)
    model_path = run.model or default_model_dir()
    train_rows, eval_rows = load_data(run)
    for rows in (train_rows, eval_rows):
        if rows.skipped:
            say(f"skipped {len(rows.skipped)} bad line(s) in {rows.source}, first at {rows.skipped[0]}")
    task = task_class(run.task)(load_tokenizer(model_path), run.max_length, run.column_map())
    task.check(train_rows)
    task.check(eval_rows)
    task.fit(train_rows)
    train_features, eval_features = task.encode(train_rows), task.encode(eval_rows)
    say(f"data: {len(train_features)} training rows ({train_rows.source}), "
        f"{len(eval_features)} evaluation rows ({eval_rows.source})")
    model = task.load_model(model_path).to(device)
    attach(model, adapter_config(run, task, model))
    say(summary(model))
    write_run_file(Path(train.output_dir), run, train, model_path, task)
    trainer = Trainer(model, task, train_features, eval_features, train)
    if not run.resume:
        before = trainer.evaluate()
        say("before training: " + _format(before))
    say(f"training {trainer.total_steps} steps: batch {train.batch_size} x {train.grad_accum}, lr {train.lr}, "
        f"{train.schedule} schedule, {torch.get_num_threads()} threads, {device}")
    result = trainer.fit(resume=run.resume)
    say("after training: " + _format(result.metrics))
    say(f"adapter saved to {result.adapter_dir} (peft format); metrics log: {Path(train.output_dir) / 'metrics.jsonl'}")
    return result


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "(no evaluation data)"


def rebuild(run_dir: Path, adapter: str = "adapter") -> tuple[nn.Module, Task, RunOptions]:
    """The model of a finished run with its trained adapter loaded, and its task."""
    record = read_run_file(run_dir)
    run, _ = split_options(record["options"])
    device = setup_device(run)
    task = task_class(run.task)(load_tokenizer(record["model"]), run.max_length, run.column_map(), record["task_state"])
    model = task.load_model(record["model"])
    load(model, run_dir / adapter)
    return model.to(device).eval(), task, run
