"""One rank of an evaluation split across ranks, for tests/test_distributed.py, started by torchrun.

Every rank builds the same tiny model, task and evaluation rows per task type (seeded), evaluates
them through ``Trainer.evaluate`` (data parallel, or sharded with ``--fsdp``) and writes, per task
type, the metrics it got, how many rows its own task evaluated and the gathered per-row outputs it
scored to ``<out>/rank<R>.json``; the test compares them with one process evaluating the whole set
(``build`` here, in the test's process).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from task_runs import DATA, FIXTURE_ARCH, Rows  # this script's folder (tests/) is first on sys.path
from task_fixtures import scored_pair_rows
from torch import nn

import deltatune as dt
from deltatune.train import TrainConfig, Trainer, distributed
from deltatune.train.data import Rows as RowSource
from deltatune.train.tasks import Task, task_class
from deltatune.train.tasks.base import Features
from deltatune.train.tasks.seq_cls import SequenceClassification
from deltatune.train.trainer import seed_everything

EVAL_ROWS = 9
"""Odd: the two ranks' slices cannot be equal (5 rows and 4, filled up to 5)."""
EVAL_BATCH = 2
"""Small, so that each slice is batched differently from the whole set."""
TARGETS = {"bert": ("query", "value"), "llama": ("q_proj", "v_proj"), "t5": ("q", "v")}

KINDS: dict[str, tuple[str, Callable[[int, int], Rows]]] = {
    **{task: (task, rows) for task, rows in DATA.items()},
    # scored pairs: Spearman over the whole set; unscored: each first sentence retrieves among all second ones
    "feature-extraction-scored": ("feature-extraction", scored_pair_rows),
    "seq-cls-whole": ("seq-cls", DATA["seq-cls"])}
"""Kind -> (task type, its rows): every task type in the registry, feature extraction both ways, and a task
of one's own without per-row outputs (``WholeSet``)."""


class WholeSet(SequenceClassification):
    """A task of one's own that overrides only ``evaluate`` (no per-row outputs): it is evaluated whole."""

    outputs = Task.outputs  # the base's again: nothing kept per row
    evaluated: list[int] = []

    def evaluate(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> dict[str, float]:
        self.evaluated.append(len(features))
        return SequenceClassification.score(self, features, self._predicted_ids(model, features, batch_size))


def task_of(kind: str) -> str:
    return KINDS[kind][0]


def arch_of(kind: str) -> str:
    return FIXTURE_ARCH[task_of(kind)][0]


def build(kind: str, folder: Path) -> tuple[nn.Module, Task, list[Any]]:
    """The model (with a LoRA adapter), task and evaluation features of ``kind``, the same on every call."""
    from transformers import AutoTokenizer

    task_name, data = KINDS[kind]
    seed_everything(0)
    task = (WholeSet if kind == "seq-cls-whole" else task_class(task_name))(AutoTokenizer.from_pretrained(folder),
                                                                           max_length=48)
    rows = RowSource(data(EVAL_ROWS, 2), "eval")
    task.fit(rows)
    model = task.load_model(str(folder))
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[arch_of(kind)],
                                   task_type=task.task_type))
    # a non-zero adapter (LoRA's B starts at zero), so that it takes part in every forward
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model, task, task.encode(rows)


def trainer(model: nn.Module, task: Task, features: Sequence[Any], out: Path, fsdp: bool = False) -> Trainer:
    config = TrainConfig(output_dir=str(out), max_steps=1, batch_size=4, eval_batch_size=EVAL_BATCH, progress=False,
                         fsdp=fsdp)
    return Trainer(model, task, features, features, config)


def leaves(value: Any) -> list[Any]:
    """The numbers, strings and flags in a task's per-row outputs, in order (tensors as their numbers)."""
    if isinstance(value, torch.Tensor):
        return leaves(value.tolist())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def evaluate(kind: str, folder: Path, out: Path, fsdp: bool) -> dict[str, Any]:
    """This rank's metrics of ``kind``, how many rows its task evaluated, and the gathered per-row outputs
    the metrics were scored from (as ``leaves``)."""
    model, task, features = build(kind, folder)
    seen: list[int] = []
    scored: list[Any] = []
    outputs, score = task.outputs, task.score

    def counted(model: nn.Module, features: Sequence[Any], batch_size: int) -> list[Any]:
        seen.append(len(features))
        return outputs(model, features, batch_size)

    def kept(features: Sequence[Any], gathered: Sequence[Any]) -> dict[str, float]:
        scored.append(leaves(list(gathered)))
        return score(features, gathered)

    # instance attributes: the class's own methods stay, so the trainer still splits the evaluation
    task.outputs, task.score = counted, kept  # type: ignore[method-assign, assignment]
    metrics = trainer(model, task, features, out / kind, fsdp).evaluate()
    return {"metrics": metrics, "rows": seen + WholeSet.evaluated, "outputs": scored}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True, help="a model folder per kind, named by the kind")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {kind: evaluate(kind, args.root / kind, args.out, args.fsdp) for kind in args.kinds}
    except BaseException:
        dist.destroy_process_group()
        raise
    distributed.finish()  # a barrier first: the last collectives must be released before Python exits
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
