"""Save and load adapters in peft's on-disk format, both ways, exactly.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.<peft tensor name>`` with the adapter name left out; the
adapter named "default" goes in the folder itself and every other one in a subfolder named
after it, as peft does. Only safetensors is read: nothing from an adapter folder is ever
unpickled. Loading checks every key and shape before the model is touched, so a bad file
leaves the model exactly as it was; each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import hf
from .config import DeltaConfig, TargetedConfig
from .errors import AdapterFileError, ConfigError
from .inject import AttachPlan, apply, plan, trainable_biases
from .layer import Delta
from .registry import method_named
from .state import delta_layers, saved_modules, state_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
PREFIX = "base_model.model."
PEFT_ARTIFACTS = ("original_module", "modules_to_save")
"""Path parts peft writes for bias="all" next to modules_to_save; they carry no extra information."""


def adapter_folder(directory: Path, name: str) -> Path:
    """Where adapter ``name`` lives in a saved folder: the root for "default", else a subfolder (as peft)."""
    return directory if name == "default" else directory / name


def _by_module_path(deltas: Mapping[str, Delta], copies: Mapping[str, nn.Module],
                    saving: bool = False) -> dict[str, Tensor]:
    """Tensors keyed ``<module path>.<peft name>``: what a file key is, less ``base_model.model.``.
    ``saving`` gives the form a file holds (``Delta.tensors_to_save``) instead of the live tensors."""
    out: dict[str, Tensor] = {}
    for key, delta in deltas.items():
        out.update({f"{key}.{k}": t for k, t in (delta.tensors_to_save() if saving else delta.tensors()).items()})
    for key, module in copies.items():
        out.update({f"{key}.{k}": t for k, t in module.state_dict().items()})
    return out


def adapter_tensors(model: nn.Module, name: str, saving: bool = False) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors under peft's file keys (live tensors, not copies; with ``saving``,
    in the form a file holds them)."""
    deltas = {key: layer.delta(name) for key, layer in delta_layers(model) if name in layer.deltas}
    copies = {key: module.copies[name] for key, module in saved_modules(model) if name in module.copies}
    out = {**_by_module_path(deltas, copies, saving), **trainable_biases(model, name)}
    part = state_of(model).model_deltas.get(name)
    return {**{PREFIX + key: t for key, t in out.items()}, **(part.tensors() if part is not None else {})}


def config_dict(model: nn.Module, name: str) -> dict[str, Any]:
    """The adapter_config.json content peft would write for adapter ``name``."""
    config = state_of(model).require(name)
    data = config.to_peft_dict()
    data["base_model_name_or_path"] = config.base_model_name_or_path or hf.name_or_path(model)
    data["auto_mapping"] = hf.auto_mapping(model, config.task_type)
    data["inference_mode"] = True
    if isinstance(config, TargetedConfig):  # peft records the task heads it added
        data["modules_to_save"] = list(config.saved_module_names()) or None
    return dict(sorted(data.items()))


def _write_files(folder: Path, writers: dict[str, Any]) -> None:
    """Write every file to a temporary name in ``folder`` first, then rename them all into place.

    ``writers`` maps a file name to ``write(tmp_path)``. A failure while writing leaves the old
    files untouched and no temporary file behind; only the renames, which do not fail in
    practice on one filesystem, happen after the first new file is in place.
    """
    staged: dict[str, str] = {}
    try:
        for name, write in writers.items():
            handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(handle)
            staged[name] = tmp
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for name, tmp in staged.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def save(model: nn.Module, directory: str | os.PathLike[str], names: Sequence[str] | None = None) -> Path:
    """Save adapters (all by default) as peft-format folders under ``directory``; returns it."""
    state = state_of(model)
    root = Path(directory)
    for name in list(state.configs) if names is None else names:
        state.require(name)
        folder = adapter_folder(root, name)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in adapter_tensors(model, name, saving=True).items()}
        text = json.dumps(config_dict(model, name), indent=2) + "\n"
        _write_files(folder, {
            WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
            CONFIG_NAME: lambda p: Path(p).write_text(text, encoding="utf-8"),
        })
    return root


def read_config(folder: Path) -> DeltaConfig:
    """The config stored in an adapter folder, with a clear error for a missing or broken file."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        where = f"folder {folder} holds {found}" if folder.is_dir() else f"{folder} is not a folder"
        pickled = [n for n in PICKLE_NAMES if n in found]
        nested = [n for n in found if (folder / n / CONFIG_NAME).is_file()]
        hint = f" It holds {pickled[0]}, a pickle file, which deltatune never loads." if pickled else ""
        hint += f" Adapters are in its subfolders {nested}: pass one of those." if nested else ""
        raise AdapterFileError(f"no {CONFIG_NAME} found: {where}.{hint} Pass the folder that dt.save or peft wrote.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); the file is corrupt.") from err
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterFileError(f"{path} has no 'peft_type' key; it is not an adapter config.")
    config_class = method_named(str(data["peft_type"]), str(path)).config_class
    try:
        return config_class.from_peft_dict(data, str(path))
    except (ConfigError, TypeError) as err:
        raise AdapterFileError(f"{path}: {err}") from err


def read_tensors(folder: Path) -> dict[str, Tensor]:
    """The tensors of an adapter folder; refuses pickle files and reports corrupt ones."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickled = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickled:
            raise AdapterFileError(
                f"{folder} holds {pickled[0]}, a pickle file, and no {WEIGHTS_NAME}. deltatune never unpickles "
                "adapter files (pickle can run arbitrary code). Fix: re-save the adapter with safetensors "
                "(peft: save_pretrained(..., safe_serialization=True)) from a source you trust."
            )
        raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME}.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({err}); the file is corrupt.") from err


def _base_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Base parameters by their name in a model without wrappers (what peft's keys reduce to)."""
    out = {}
    for key, param in model.named_parameters(remove_duplicate=False):  # a tied head is named too
        parts = key.split(".")
        if any(p in ("deltas", "copies") for p in parts[:-1]):
            continue
        out[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = param
    return out


def _base_overrides(model: nn.Module, config: DeltaConfig) -> dict[str, nn.Parameter]:
    """Base parameters a peft file may carry: trained biases, and the embedding tables peft
    writes (``save_embedding_layers="auto"``) when embeddings are targeted or resized."""
    uses_bias = isinstance(config, TargetedConfig) and config.trained_biases() != "none"
    tables = {id(getattr(m, "weight", None)) for m in hf.embedding_modules(model)}
    return {name: p for name, p in _base_params(model).items()
            if (uses_bias and name.endswith("bias")) or id(p) in tables}


def _match(model: nn.Module, attach_plan: AttachPlan, tensors: dict[str, Tensor], source: Path) -> list[tuple[Tensor, Tensor]]:
    """Pair every file tensor with the planned (or base) tensor it fills; raise on any mismatch."""
    expected = {PREFIX + k: t for k, t in _by_module_path(attach_plan.deltas, attach_plan.saved).items()}
    expected.update(attach_plan.model_delta.tensors() if attach_plan.model_delta is not None else {})
    base = _base_overrides(model, attach_plan.config)
    pairs, unexpected = [], []
    for file_key, value in tensors.items():
        target = expected.pop(file_key, None)
        if target is None and not file_key.startswith(PREFIX):
            unexpected.append(file_key)
            continue
        key = file_key[len(PREFIX):]
        if target is None and any(p in PEFT_ARTIFACTS for p in key.split(".")[:-1]):
            continue
        if target is None:
            target = base.get(key.replace(".base_layer.", "."))
        if target is None:
            unexpected.append(file_key)
        elif target.shape != value.shape:
            raise AdapterFileError(
                f"{source}: tensor {file_key!r} has shape {tuple(value.shape)} but the model needs "
                f"{tuple(target.shape)} there (check r, rank_pattern and that this adapter was made for this model). "
                "The model was left unchanged."
            )
        else:
            pairs.append((target, value))
    if unexpected:
        raise AdapterFileError(
            f"{source}: {len(unexpected)} tensor(s) match nothing in the model, e.g. {unexpected[:3]}; the adapter "
            "was made for a different model or config. The model was left unchanged."
        )
    if expected:
        raise AdapterFileError(
            f"{source}: missing tensor(s) {list(expected)[:3]} "
            f"({len(expected)} in all) that the config's targets need. The model was left unchanged."
        )
    return pairs


def load(model: nn.Module, directory: str | os.PathLike[str], name: str = "default",
         trainable: bool = False) -> nn.Module:
    """Load an adapter folder (written by deltatune or peft) into ``model`` as ``name``.

    The adapter is frozen unless ``trainable``; it becomes active if no adapter was active.
    Every check happens before the model changes: on any error the model is as it was.
    """
    folder = Path(directory)
    config = read_config(folder).replace(inference_mode=not trainable)
    tensors = read_tensors(folder)
    attach_plan = plan(model, config, name)
    pairs = _match(model, attach_plan, tensors, folder / WEIGHTS_NAME)
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    apply(model, attach_plan)
    return model
