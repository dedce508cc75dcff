"""The model a server serves: a base model folder or a ``deltatune train`` run folder, loaded offline.

A base folder is loaded with transformers' ``AutoModelForCausalLM`` (or, when its config names a
``...ForSequenceClassification`` architecture, for classification). A run folder rebuilds the run's
model (``train.run.rebuild``): a causal-lm run serves text, a seq-cls run classifies; its trained
adapter is served under the run folder's name, the run's base model under the base folder's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..adapters import active_adapters
from ..errors import DataError
from ..hf import config_value, from_pretrained, load_tokenizer
from ..train.run import RUN_FILE, TRAINED, read_run_file, rebuild
from ..train.tasks.common import ensure_pad_token

Kind = Literal["generate", "classify"]
TASK_KINDS: dict[str, Kind] = {"CAUSAL_LM": "generate", "SEQ_CLS": "classify"}


@dataclass
class ServedModel:
    """What the server needs of its model; ``own_adapter`` is a run's trained adapter (served name, internal name)."""

    model: nn.Module
    tokenizer: Any
    kind: Kind
    base_name: str
    base_path: str
    own_adapter: tuple[str, str] | None = None
    max_length: int = 512
    """Classification: texts are cut to this many tokens (the run's --max-length)."""

    def context_length(self) -> int | None:
        """The most positions the model takes (prompt + generated), when its config says."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = config_value(self.model, key)
            if isinstance(value, int) and value > 0:
                return value
        return None


def load_served(path: str, served_name: str = "", device: str = "") -> ServedModel:
    """The model at ``path`` (a run folder or a transformers model folder), in eval mode on ``device``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"--model {path}: no such folder; give a transformers model folder (config.json and weights) "
                        "or a `deltatune train` run folder (run.json)")
    served = _from_run(folder, served_name) if (folder / RUN_FILE).is_file() else _from_base(folder, served_name)
    target = torch.device(device) if device else next(served.model.parameters()).device
    served.model = served.model.to(target).eval()
    return served


def _from_base(folder: Path, served_name: str) -> ServedModel:
    config = folder / "config.json"
    if not config.is_file():
        raise DataError(f"--model {folder}: no config.json; give a transformers model folder saved with "
                        "save_pretrained, or a `deltatune train` run folder")
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    kind: Kind = "classify" if any(a.endswith("ForSequenceClassification") for a in architectures) else "generate"
    model = from_pretrained("AutoModelForSequenceClassification" if kind == "classify" else "AutoModelForCausalLM",
                            str(folder))
    tokenizer = load_tokenizer(str(folder))
    if kind == "classify":
        _pad_for_classification(model, tokenizer)
    return ServedModel(model, tokenizer, kind, served_name or folder.name, str(folder),
                       max_length=_classify_length(tokenizer, model))


def _from_run(folder: Path, served_name: str) -> ServedModel:
    record = read_run_file(folder)
    model, task, run = rebuild(folder)
    kind = TASK_KINDS.get(task.task_type)
    if kind is None:
        raise DataError(f"--model {folder}: a {run.task} run; the server serves causal-lm runs (text generation) "
                        "and seq-cls runs (classification)")
    if active_adapters(model) != (TRAINED,):
        raise DataError(f"--model {folder}: the run's adapter computes with others ({active_adapters(model)}); the "
                        "server gives each request one adapter, so it serves adapters that compute alone")
    base = Path(record["model"])
    return ServedModel(model, task.tokenizer, kind, served_name or base.name, str(base),
                       own_adapter=(folder.resolve().name, TRAINED), max_length=task.max_length)


def _pad_for_classification(model: nn.Module, tokenizer: Any) -> None:
    """Batches of texts need a pad token; a decoder's head finds each row's last token by the config's pad id."""
    ensure_pad_token(tokenizer, "seq-cls")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def _classify_length(tokenizer: Any, model: nn.Module) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    positions = config_value(model, "max_position_embeddings")
    values = [v for v in (limit, positions) if isinstance(v, int) and 0 < v < 1_000_000]
    return min(values, default=512)
