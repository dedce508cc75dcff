"""What ``deltatune eval``, ``predict``, ``merge`` and ``inspect`` do, as plain functions."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import adapter_names
from ..analysis import COLUMNS, LayerDelta, layer_deltas
from ..errors import ConfigError, DataError
from ..files import follow_umask
from ..io import CONFIG_NAME, load, read_config, read_tensors
from ..merge import unload
from ..targets import is_saved_module
from ..hf import from_pretrained, load_tokenizer
from .data import Row, Rows, read_rows, rows_of_split, saved_splits
from .options import RunOptions, split_options
from .run import RUN_FILE, eval_source, load_data, read_eval_rows, read_run_file, rebuild, spread
from .report import classification_report
from .tasks import Task, task_class

AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}
"""Model classes for adapters without a run folder (heads of other task types need its label set)."""


def evaluate_run(run_dir: Path, data: str = "", split: str = "", adapter: str = "adapter",
                 max_rows: int = 0, threads: int = 0, report: bool = False) -> dict[str, Any]:
    """The task's metrics for a finished run on its evaluation data, or on another file/split; ``report``
    adds a classification run's per-class scores and confusion matrix (under "report")."""
    model, task, run = rebuild(run_dir, adapter, threads)
    rows = task.usable(spread(_evaluation_rows(run, data, split), max_rows), run.skip_bad_rows)
    metrics: dict[str, Any] = dict(task.evaluate(model, task.encode(rows), 64))
    if report:
        metrics["report"] = _class_report(model, task, rows)
    return metrics


def _class_report(model: nn.Module, task: Task, rows: Rows) -> dict[str, Any]:
    """Per-class scores of a classification run (one label per row) on ``rows``."""
    labels = getattr(task, "labels", None)
    if task.task_type != "SEQ_CLS" or labels is None:
        raise ConfigError("deltatune eval", "report", True, f"a per-class report needs a classification (seq-cls) "
                          f"run; this one is {task.name}", "drop --report")
    column = task.column("label")
    gold = [str(row[column]) for row in rows.rows]
    return classification_report(gold, [str(p) for p in task.predict(model, rows.rows)], labels.names)


def _evaluation_rows(run: RunOptions, data: str, split: str) -> Rows:
    """``data`` (else the run's evaluation data); a named ``split`` of it is taken as named, never
    replaced by another (a saved DatasetDict's "validation" fallback is for the run's default only).
    The run's own data is capped at its --max-eval-rows, as during training; ``data`` is not."""
    if split:
        rows = rows_of_split(data or eval_source(run), split,
                             run.split_column, run.skip_bad_rows)
        return rows if data else spread(rows, run.max_eval_rows)
    if data:
        return read_eval_rows(data, run) if saved_splits(data) else read_rows(data, run.skip_bad_rows)
    return load_data(run)[1]


def predict_run(run_dir: Path, rows: list[Row], adapter: str = "adapter", threads: int = 0) -> list[dict[str, Any]]:
    """The run's prediction for each raw row (columns as in its training data): ``{"prediction": ...}``, and
    for a classification run its ``score`` (the predicted label's probability) and every label's ``probabilities``."""
    model, task, _ = rebuild(run_dir, adapter, threads)
    scores = getattr(task, "probabilities", None)
    if not callable(scores):
        return [{"prediction": prediction} for prediction in task.predict(model, rows)]
    results = []
    for probabilities in scores(model, rows):
        label = max(probabilities, key=probabilities.__getitem__)
        results.append({"prediction": label, "score": probabilities[label], "probabilities": probabilities})
    return results


def rows_to_predict(run_dir: Path, file: str, split: str = "") -> Rows:
    """The rows of ``file`` to predict: all of them, or its ``split`` (a saved DatasetDict's split, else
    the rows whose run's --split-column holds ``split``)."""
    if not split:
        return read_rows(file)
    run, _ = split_options(read_run_file(run_dir)["options"])
    return rows_of_split(file, split, run.split_column)


def first_role_column(run_dir: Path) -> str:
    """The column a bare ``--text`` fills (the task's first input role), read from run.json alone:
    building the model here would load it twice, since ``predict_run`` builds it again."""
    run, _ = split_options(read_run_file(run_dir)["options"])
    roles = task_class(run.task).columns
    role = next(iter(roles))
    return run.column_map().get(role, roles[role])


def is_run(folder: Path) -> bool:
    return (folder / RUN_FILE).is_file()


def model_for_adapter(folder: Path, model_path: str = "") -> tuple[nn.Module, Any]:
    """A base model (and its tokenizer, or None) with the adapter in ``folder`` loaded as "default".

    A run folder rebuilds its own model; a bare adapter folder needs ``model_path`` (or the
    base_model_name_or_path its config records) and a task type without a classification head.
    """
    if is_run(folder):
        model, task, _ = rebuild(folder)
        return model, task.tokenizer
    config = read_config(folder)
    path = model_path or (config.base_model_name_or_path or "")
    if not path:
        raise DataError(f"{folder}/{CONFIG_NAME} names no base model; pass --model FOLDER")
    class_name = AUTO_CLASSES.get(config.task_type or "", "AutoModel")
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        raise DataError(f"{folder} is a {config.task_type} adapter outside a run folder: its head size is unknown. "
                        "Pass the run folder that `deltatune train` wrote (it holds run.json)")
    model = from_pretrained(class_name, path)
    load(model, folder)
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def merge_to_folder(source: Path, output: Path, model_path: str = "", adapter: str = "adapter") -> Path:
    """Base + adapter -> a merged model folder that transformers loads without deltatune."""
    check_output_folder(output)  # before the model is built: a bad --output must not cost a model load
    if is_run(source):
        model, task, _ = rebuild(source, adapter)
        tokenizer = task.tokenizer
    else:
        model, tokenizer = model_for_adapter(source, model_path)
    plain = unload(model, merge=True)
    output.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(output)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    follow_umask(output)  # safetensors writes its files private (0600)
    return output


def check_output_folder(output: Path) -> None:
    """Refuse an ``--output`` that is a file, or under one, before anything is written."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                where = "is an existing file" if path == output else f"is under {path}, which is a file"
                raise ConfigError("deltatune merge", "output", str(output), f"{where}, not a folder",
                                  "pass a new folder path (or an existing folder) for the merged model")
            return


def inspect_adapter(folder: Path, model_path: str = "") -> dict[str, Any]:
    """Config, parameter counts and, when the base model can be loaded, per-layer ΔW statistics."""
    adapter_dir = folder / "adapter" if is_run(folder) else folder
    config = read_config(adapter_dir)
    tensors = read_tensors(adapter_dir)
    report: dict[str, Any] = {
        "folder": str(adapter_dir), "method": type(config).__name__,
        "config": {k: v for k, v in sorted(config.to_peft_dict().items()) if v not in (None, [], {}, ())},
        "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
    }
    try:
        model, _ = model_for_adapter(folder, model_path)
    except (DataError, OSError) as error:
        report["layers"] = f"not computed: {error}"
        return report
    name = adapter_names(model)[0]
    _split_saved_modules(report, model)
    report["layers"] = [asdict(layer) for layer in layer_deltas(model, name)]
    return report


def _split_saved_modules(report: dict[str, Any], model: nn.Module) -> None:
    """List only the ``modules_to_save`` entries that name a module of this model; the others (a task
    type's heads that peft writes under every name transformers uses, like ``score`` beside
    ``classifier``) go to ``modules_to_save_absent`` with a remark."""
    config = report["config"]
    names = [str(n) for n in config.get("modules_to_save") or ()]
    keys = [key for key, _ in model.named_modules()]
    absent = [n for n in names if not any(is_saved_module(key, [n]) for key in keys)]
    if absent:
        config["modules_to_save"] = [n for n in names if n not in absent]
        report["modules_to_save_absent"] = absent
        report["remark"] = (f"modules_to_save also names {absent}, which this model does not have; nothing was "
                            "trained or saved for them (peft lists every head name of the task type)")


def format_layers(layers: list[dict[str, Any]] | str) -> str:
    """The ΔW table as aligned text."""
    if isinstance(layers, str):
        return layers
    lines = [f"{'module':<48} {'||dW||':>10} {'rel':>9} {'eff.rank':>9} {'rank':>5}"]
    for item in layers:
        d = LayerDelta(**{**item, "shape": tuple(item["shape"])})
        lines.append(f"{d.module:<48} {d.norm:>10.4g} {d.relative_norm:>9.3g} {d.effective_rank:>9.2f} {d.rank:>5}")
    return "\n".join([*lines, COLUMNS])


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
