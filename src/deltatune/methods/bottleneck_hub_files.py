"""Reading AdapterHub's files safely, and what a load does with the head files beside an adapter.

Weights: ``*.safetensors`` is preferred; a pickled ``*.bin`` (AdapterHub's default) is read only by
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses everything else
before running it; a file it refuses is refused here too, never retried with a full unpickler.

Head files (``head_config.json`` + ``model_head.safetensors`` / ``pytorch_model_head.bin``): AdapterHub saves,
with an adapter of a model that has a head, every state-dict entry outside the base model (``classifier.*``
of a sequence classifier; the full ``lm_head.weight`` of a causal or T5 LM). A load decides, before the
model changes:

- the head tensors equal the model's own (an LM head of the same checkpoint): nothing to load, skipped;
- the model is of the file's class and has exactly those tensors with equal shapes: the adapter gets its own
  copy of those modules (``modules_to_save``), filled from the file; it computes while the adapter is active,
  the base head stays as it was (``dt.disabled`` still gives the base model), and it goes with the adapter
  (saved with it, freed by ``dt.delete_adapter``);
- the model is of another class (e.g. a bare ``BertModel``; AdapterHub's own check): skipped, with a warning
  naming the tensors left out; the adapter itself loads;
- the same class with other tensors or shapes (e.g. another ``num_labels``): refused, the model unchanged.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .. import hf
from ..errors import AdapterFileError
from ..inject import AttachPlan
from ..state import logical_modules

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
LEGACY_NAMES = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
                "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters",
                "invertible_lang_adapters": "invertible_adapters"}
"""adapter-transformers 2.x module names, renamed in every key by AdapterHub's loader."""
RESAVE = "re-save it from a source you trust with model.save_adapter(dir, name, use_safetensors=True)"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with a clear error for a missing or broken file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise AdapterFileError(f"{path} does not exist; pass the folder AdapterHub's save_adapter wrote.") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); the file is corrupt.") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds {type(data).__name__}, not a JSON object; the file is corrupt.")
    return data


def _load_pickled(path: Path) -> dict[str, Tensor]:
    """A ``.bin`` through ``torch.load(weights_only=True)`` only: a file holding anything but tensors in plain
    containers is refused by torch before any of it runs, and then by this function."""
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AdapterFileError(
            f"{path} cannot be read with torch.load(weights_only=True) ({reason}). deltatune never unpickles "
            f"anything else (pickle can run arbitrary code). Fix: {RESAVE}.") from err
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise AdapterFileError(f"{path} holds {type(data).__name__}, not a mapping of names to tensors. Fix: {RESAVE}.")
    return dict(data)


def read_weights(folder: Path, names: tuple[str, str]) -> tuple[dict[str, Tensor], Path] | None:
    """The tensors of the first of (safetensors file, ``.bin`` file) present in ``folder``, and that file's
    path; None if neither is there."""
    safe, pickled = folder / names[0], folder / names[1]
    if safe.is_file():
        try:
            return load_file(safe), safe
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(f"{safe} is not a readable safetensors file ({err}); the file is corrupt.") from err
    return (_load_pickled(pickled), pickled) if pickled.is_file() else None


@dataclass(frozen=True)
class Head:
    """The head modules an adapter will carry its own copies of, and the file's tensors for them."""

    modules: tuple[str, ...] = ()
    tensors: Mapping[str, Tensor] = field(default_factory=dict)


def read_head(model: nn.Module, folder: Path) -> Head:
    """Decide what the folder's head files mean for ``model`` (module docstring); nothing is changed."""
    weights = read_weights(folder, HEAD_WEIGHTS)
    if weights is None or not weights[0]:
        return Head()
    tensors, source = weights
    meta = read_json(folder / HEAD_CONFIG) if (folder / HEAD_CONFIG).is_file() else {}
    saved_class, own_class = meta.get("model_class"), type(model).__name__
    if saved_class is not None and saved_class != own_class:
        warnings.warn(f"{folder}: the head files hold {sorted(tensors)} for a {saved_class}; this model is a {own_class}, "
                      "so they were not loaded (AdapterHub skips them too); the adapter itself was.", stacklevel=5)
        return Head()
    tops = tuple(sorted({key.split(".")[0] for key in tensors}))
    modules = dict(logical_modules(model))
    own = {f"{top}.{k}": t for top in tops if top in modules for k, t in modules[top].state_dict().items()}
    if set(own) != set(tensors) or any(own[k].shape != v.shape for k, v in tensors.items()):
        differ = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
        raise AdapterFileError(
            f"{source}: the head files do not fit this {own_class}: file-only tensors {sorted(set(tensors) - set(own))[:4]}, "
            f"model-only {sorted(set(own) - set(tensors))[:4]}, other shapes {differ[:4]} (head_config.json: num_labels="
            f"{meta.get('num_labels')}). Fix: build the model as the adapter's was (e.g. num_labels), or remove "
            f"{HEAD_CONFIG} and the head weights from the folder to load the adapter without its head. "
            "The model was left unchanged.")
    if all(torch.equal(own[k].detach().to("cpu", v.dtype), v) for k, v in tensors.items()):
        return Head()  # the model's own head already (e.g. the LM head of the same checkpoint)
    return Head(tops, tensors)


def head_pairs(attach_plan: AttachPlan, head: Head, source: Path) -> list[tuple[Tensor, Tensor]]:
    """(planned copy tensor, file value) for every head tensor the adapter carries."""
    if set(attach_plan.saved) != set(head.modules):
        raise AdapterFileError(f"{source}: head modules {list(head.modules)} also match modules "
                               f"{sorted(set(attach_plan.saved) - set(head.modules))} by name; cannot carry them exactly.")
    return [(t, head.tensors[f"{top}.{k}"]) for top in head.modules
            for k, t in attach_plan.saved[top].state_dict(keep_vars=True).items()]


def head_config(model: nn.Module, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``head_config.json`` as AdapterHub writes it for a model with a static (transformers) head."""
    extra = {"label2id": hf.config_value(model, "label2id"), "num_labels": hf.config_value(model, "num_labels")}
    return {**meta, **{k: dict(v) if isinstance(v, Mapping) else v for k, v in extra.items() if v is not None},
            "config": None, "name": None}


def without_prefix(key: str, prefix: str | None) -> str:
    """``key`` relative to the base model: AdapterHub files of a model with a head carry the prefix, others not."""
    return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key


def legacy(key: str) -> str:
    for old, new in LEGACY_NAMES.items():
        key = key.replace(old, new)
    return key


def match_keys(expected: Mapping[str, tuple[str, Tensor]], prefix: str | None, tensors: Mapping[str, Tensor],
               source: Path, hint: Callable[[list[str]], str]) -> list[tuple[Tensor, Tensor]]:
    """(planned tensor, file value) for every planned tensor; ``expected``: file key (without the base-model prefix)
    -> (deltatune's name for the tensor, the planned tensor; two keys may fill one tensor, and must then hold equal
    values). Raises on an extra, missing or duplicated key, a shape that differs, or differing copies; ``hint``
    explains unexpected keys."""
    found: dict[str, tuple[str, Tensor]] = {}
    for key, value in tensors.items():
        canonical = without_prefix(legacy(key), prefix)
        if canonical in found:
            raise AdapterFileError(f"{source}: tensors {[found[canonical][0], key]} are one tensor stored twice (with and "
                                   f"without the base-model prefix {prefix!r}); the file is ambiguous. The model was left unchanged.")
        found[canonical] = (key, value)
    unexpected = sorted(found[k][0] for k in set(found) - set(expected))
    if unexpected:
        raise AdapterFileError(
            f"{source}: {len(unexpected)} tensor(s) that the config does not account for, e.g. {unexpected[:3]}."
            f"{hint(unexpected)} Either the adapter was made for a different model or config, "
            "or the file is damaged. The model was left unchanged.")
    missing = sorted(set(expected) - set(found))
    if missing:
        unprefixed = f"; compared without the base-model prefix {prefix!r}" if prefix else ""
        raise AdapterFileError(f"{source}: missing tensor(s) {missing[:3]} ({len(missing)} in all{unprefixed}) that the "
                               "config's sites need. The model was left unchanged.")
    by_target: dict[str, tuple[Tensor, list[tuple[str, Tensor]]]] = {}
    for canonical, (ours, target) in expected.items():
        key, value = found[canonical]
        if value.shape != target.shape:
            raise AdapterFileError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} but the model needs {tuple(target.shape)} "
                "there (check the config and that this adapter was made for this model). The model was left unchanged.")
        by_target.setdefault(ours, (target, []))[1].append((key, value))
    for ours, (_, copies) in by_target.items():
        if any(not torch.equal(copies[0][1], v) for _, v in copies[1:]):
            raise AdapterFileError(f"{source}: {[k for k, _ in copies]} are two copies of one layer norm ({ours}) and "
                                   "must be equal; they differ, so the file is inconsistent. The model was left unchanged.")
    return [(target, copies[0][1]) for target, copies in by_target.values()]
