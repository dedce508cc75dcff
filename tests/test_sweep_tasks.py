"""``deltatune sweep`` for every task type ``deltatune train`` supports beyond sequence classification
(test_sweep.py covers that): a real two-step sweep of a tiny model per task, through the command line,
records each run as "ok" with the metrics the task's final evaluation reports, finite and equal to a
fresh ``deltatune eval`` of the saved run folder; the report table has a column for each; the run
folder holds the adapter. One sweep may also hold a cell per task, each run in a process of its own."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from task_runs import DATA, FIXTURE_ARCH, write
from task_runs import folders  # noqa: F401  (a fixture, used by name)

from deltatune.cli import main
from deltatune.sweep import expand, parse_spec, read_records
from deltatune.sweep.grid import MAX_FOLDER

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

METRICS = {
    "causal-lm": {"neg_loss", "loss", "perplexity"},
    "seq2seq": {"neg_loss", "loss", "perplexity", "exact_match"},
    "token-cls": {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"},
    "qa": {"f1", "exact_match"},
    "feature-extraction": {"accuracy_at_1", "pair_cosine"},
}
"""What each task's evaluation reports (its ``score``); sequence classification is test_sweep.py's."""


BASE = {"method": "lora", "max_steps": 2, "batch_size": 8, "max_length": 48, "lr": 1e-2, "threads": 1,
        "progress": False}


def task_options(tmp: Path, task: str, model: Path) -> dict[str, str]:
    """The task, its model and 16 training rows (as test_tasks.py's runs, so every tag of the
    evaluation rows is seen in training), 4 to evaluate, written under ``tmp``."""
    return {"task": task, "model": str(model), "train_file": write(tmp / f"{task}-train.jsonl", DATA[task](16, 1)),
            "eval_file": write(tmp / f"{task}-eval.jsonl", DATA[task](4, 2))}


def sweep_file(tmp: Path, task: str, model: Path) -> Path:
    """A sweep of two LoRA cells (r 1 and 2), one seed, two steps."""
    base = {**BASE, **task_options(tmp, task, model)}
    path = tmp / "sweep.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp / "sweep"), "seeds": [0], "base": base, "grid": {"r": [1, 2]}}))
    return path  # JSON is YAML


@pytest.mark.parametrize("task", list(METRICS))
def test_a_real_sweep_of_the_task_records_its_metrics(task: str, tmp_path: Path, folders: Callable[[str, str], Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = sweep_file(tmp_path, task, folders(task, FIXTURE_ARCH[task][0]))
    assert main(["sweep", str(config), "--in-process", "--report", "--no-plots"]) == 0, capsys.readouterr().err
    records = read_records(tmp_path / "sweep" / "results.jsonl")
    assert [(r["cell"], r["status"], r["error"]) for r in records] == [("r=1", "ok", None), ("r=2", "ok", None)]
    for record in records:
        metrics = record["metrics"]
        assert set(metrics) == METRICS[task] and all(math.isfinite(v) for v in metrics.values()), metrics
        assert record["steps"] == 2 and math.isfinite(record["train_loss"]) and record["tokens"] > 0
        run_dir = Path(record["run_dir"])
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
        capsys.readouterr()
        assert main(["eval", str(run_dir)]) == 0
        assert json.loads(capsys.readouterr().out) == pytest.approx(metrics, abs=1e-5)  # the saved run's own score
    assert records[0]["trainable_parameters"] < records[1]["trainable_parameters"]  # r=1 trains fewer than r=2
    report = (tmp_path / "sweep" / "results.md").read_text().splitlines()
    header = next(line for line in report if line.startswith("| r |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert METRICS[task] <= set(columns), columns


def test_one_sweep_with_a_cell_per_task_runs_each_in_its_own_process(
        tmp_path: Path, folders: Callable[[str, str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Cells that set the task, model and data files: every run is "ok" with its own task's metrics,
    and the table leaves a metric blank for the cells whose task does not report it."""
    tasks = ["causal-lm", "token-cls"]
    cells = [task_options(tmp_path, task, folders(task, FIXTURE_ARCH[task][0])) for task in tasks]
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "sweep"), "base": BASE, "cells": cells}))
    assert main(["sweep", str(config), "--report", "--no-plots"]) == 0, capsys.readouterr().err
    records = read_records(tmp_path / "sweep" / "results.jsonl")
    assert [(r["settings"]["task"], r["status"], r["error"], r["rss_scope"]) for r in records] == [
        (task, "ok", None, "run") for task in tasks]
    for task, record in zip(tasks, records):
        assert set(record["metrics"]) == METRICS[task] and all(math.isfinite(v) for v in record["metrics"].values())
        assert (Path(record["run_dir"]) / "adapter" / "adapter_config.json").is_file()
    lines = (tmp_path / "sweep" / "results.md").read_text().splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| eval_file")))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:header + 4]]
    metrics = set.union(*(METRICS[task] for task in tasks))
    for task, row in zip(tasks, rows):
        shown = {c for c, v in zip(columns, row) if c in metrics and v != "—"}
        assert shown == METRICS[task], (task, row)


def test_a_long_cell_name_gets_a_short_folder_of_its_own(tmp_path: Path) -> None:
    """A name over what a file system takes in one folder name (255 bytes) is cut and ends in a hash."""
    long_path = "/data/" + "x" * 300
    cells = expand(parse_spec({"output_dir": str(tmp_path), "cells": [
        {"model": long_path + "/a"}, {"model": long_path + "/b"}, {"model": "short"}]}))
    folders = [c.run_dir.parent.name for c in cells]
    assert folders[2] == "model=short"  # a short name keeps its folder
    assert [len(f) for f in folders[:2]] == [MAX_FOLDER, MAX_FOLDER] and folders[0] != folders[1]
    assert folders[0].startswith("model=_data_xxx") and folders[0] == expand(parse_spec(
        {"output_dir": str(tmp_path), "cells": [{"model": long_path + "/a"}]}))[0].run_dir.parent.name
    cells[0].run_dir.mkdir(parents=True)  # the file system takes it
