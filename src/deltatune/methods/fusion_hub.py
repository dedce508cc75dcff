"""AdapterHub's AdapterFusion folders (``adapters`` 1.x ``save_adapter_fusion`` / ``load_adapter_fusion``), both ways.

A fusion folder holds ``adapter_fusion_config.json`` (``adapter_names``: the members; ``config``: AdapterHub's
fusion fields or a preset name, "dynamic" / "static"; ``name``: AdapterHub's fusion name, the members joined
by commas; the model keys of every AdapterHub config) and ``model_adapter_fusion.safetensors`` or the pickled
``pytorch_model_adapter_fusion.bin`` (read with ``torch.load(weights_only=True)`` only). Weight keys are
``<site key path>.adapter_fusion_layer.<AdapterHub name>.<FusionBlock key>``; ``FusionBlock`` uses AdapterHub's
parameter names, so the keys map unchanged, matched as strictly as a bottleneck folder's (base-model prefix
optional). The members must be loaded first (under the names the file lists).

Names: an AdapterHub fusion name ("a,b") is not a valid deltatune name (letters, digits, ``_`` and ``-``), so a
loaded fusion is named after its members joined by ``_`` ("a_b") unless ``dt.load`` gets a ``name`` other than
its default "default"; a saved one gets AdapterHub's name, the members joined by ``,``, whatever its name here
(AdapterHub's ``Fuse("a", "b")`` looks the fusion up by that name). docs/adapterhub.md, section 10.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .. import hf
from ..errors import AdapterError, AdapterFileError
from ..formats import FolderFiles
from ..inject import AttachPlan, plan
from ..state import STATE_ATTR, check_name, saved_modules, state_of
from .bottleneck import BottleneckAdapter
from .bottleneck_hub_files import match_keys, read_json, read_weights, without_prefix
from .fusion import FusionAdapter, FusionConfig, StaticFusionConfig

FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
ADAPTER_CONFIG = "adapter_config.json"
LOAD_DEFAULT = "default"
"""``dt.load``'s default name: for a fusion folder it means "no name given" (the members joined by ``_``)."""
FLAGS = ("key", "query", "query_before_ln", "regularization", "residual_before", "temperature", "value",
         "value_before_softmax", "value_initialized")
FIELDS = (*FLAGS, "dropout_prob")
"""AdapterHub's ``AdapterFusionConfig`` fields: all required there (the dataclass has no defaults)."""
PRESETS: dict[str, Callable[..., FusionConfig]] = {"dynamic": FusionConfig, "static": StaticFusionConfig}
"""AdapterHub's fusion preset names (a file may store one instead of the dict)."""


def fusion_to_hub(config: FusionConfig) -> dict[str, Any]:
    """The ``config`` dict AdapterHub writes for these fusion fields (sorted, as its JSON is)."""
    out: dict[str, Any] = {f: getattr(config, f) for f in FIELDS}
    if isinstance(config.dropout_prob, (int, float)):
        out["dropout_prob"] = float(config.dropout_prob)
    return dict(sorted(out.items()))


def fusion_from_hub(data: object, source: str) -> dict[str, Any]:
    """``FusionConfig`` fields from a file's ``config`` (a dict or a preset name), read as AdapterHub reads it."""
    if isinstance(data, str) and data in PRESETS:
        return fusion_to_hub(PRESETS[data](adapter_names=("a", "b")))
    if not isinstance(data, Mapping):
        raise AdapterFileError(f"{source}: 'config' is {data!r}, neither a fusion config dict nor a preset name "
                               f"({sorted(PRESETS)}); the file is corrupt.")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise AdapterFileError(f"{source}: the fusion config lacks {missing}, which AdapterHub requires; the file is "
                               "incomplete. Fix: re-save it with AdapterHub's save_adapter_fusion.")
    bad = [f for f in FLAGS if not isinstance(data[f], bool)]
    drop = data["dropout_prob"]
    if bad or not (drop is None or (isinstance(drop, (int, float)) and not isinstance(drop, bool) and 0 <= drop < 1)):
        what = f"{bad[0]}={data[bad[0]]!r} must be true or false" if bad else f"dropout_prob={drop!r} must be in [0, 1) or null"
        raise AdapterFileError(f"{source}: {what}; the file is corrupt.")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        warnings.warn(f"{source}: ignoring keys unknown to deltatune's AdapterFusion reader: {unknown}", stacklevel=4)
    return {f: data[f] for f in FIELDS}


def _members(meta: Mapping[str, Any], source: Path) -> tuple[list[str], str]:
    """The member names and AdapterHub's fusion name (its keys are stored under it)."""
    hub_name, members = meta.get("name"), meta.get("adapter_names")
    if members is None and isinstance(hub_name, str):
        members = hub_name.split(",")  # AdapterHub's fallback: the name lists the members
    if not (isinstance(members, list) and len(members) >= 2 and all(isinstance(m, str) and m for m in members)
            and len(set(members)) == len(members)):
        raise AdapterFileError(f"{source}: 'adapter_names' is {members!r}, not a list of two or more distinct adapter "
                               "names; the file is corrupt.")
    hub_name = ",".join(members) if hub_name is None else hub_name
    if not isinstance(hub_name, str) or not hub_name:
        raise AdapterFileError(f"{source}: 'name' is {hub_name!r}, not a fusion name; the file is corrupt.")
    return members, hub_name


def _our_name(members: list[str], name: str, source: Path) -> str:
    """``name``, or for dt.load's default the members joined by ``_``; an AdapterError for a name deltatune refuses."""
    joined = "_".join(members)
    try:
        return check_name(joined if name == LOAD_DEFAULT else name)
    except AdapterError as err:
        raise AdapterError(f"{source}: {err.args[0]}. AdapterHub names a fusion by its members joined by ',', which no "
                           f"deltatune name may hold; dt.load names it {joined!r} (the members joined by '_') unless "
                           "given another valid name=...") from err


def _hint(keys: list[str], hub_name: str) -> str:
    names = sorted({m.group(1) for k in keys if (m := re.search(r"adapter_fusion_layer\.([^.]+)\.", k))} - {hub_name})
    return f" The keys name fusion(s) {names}, the config {hub_name!r}." if names else ""


def read_fusion(model: nn.Module, folder: Path, name: str, trainable: bool) -> AttachPlan:
    """An AdapterHub fusion folder -> a filled attach plan (after its members are on the model); the model is
    not touched."""
    source = folder / FUSION_CONFIG
    meta = read_json(source)
    members, hub_name = _members(meta, source)
    fields = fusion_from_hub(meta.get("config"), str(source))
    state = model.__dict__.get(STATE_ATTR)
    parts = state.model_deltas if state is not None else {}
    missing = [m for m in members if not isinstance(parts.get(m), BottleneckAdapter)]
    if missing:
        raise AdapterFileError(
            f"{folder}: this AdapterFusion attends over adapters {members}, and {missing} are not bottleneck adapters on "
            f"this model. Fix: load each member first under its name, e.g. dt.load(model, <its folder>, "
            f"name={missing[0]!r}), then the fusion. The model was left unchanged.")
    our_name = _our_name(members, name, source)
    weights = read_weights(folder, FUSION_WEIGHTS)
    if weights is None:
        raise AdapterFileError(f"{folder} has neither {FUSION_WEIGHTS[0]} nor {FUSION_WEIGHTS[1]}; pass the folder "
                               "AdapterHub's save_adapter_fusion wrote.")
    tensors, weights_path = weights
    if meta.get("model_type") not in (None, hf.model_type(model)):
        warnings.warn(f"{source}: the fusion was saved from a {meta.get('model_type')!r} model and is loaded into a "
                      f"{hf.model_type(model)!r} one; it loads if its sites and shapes fit; check that this is intended.",
                      stacklevel=3)
    source_model = meta.get("model_name")
    config = FusionConfig(adapter_names=tuple(members), **fields, inference_mode=not trainable,
                          base_model_name_or_path=source_model if isinstance(source_model, str) and source_model else None)
    attach_plan = plan(model, config, our_name)
    part = attach_plan.model_delta
    assert isinstance(part, FusionAdapter)
    prefix = hf.base_model_prefix(model)
    expected = {without_prefix(f"{site.key_path}.adapter_fusion_layer.{hub_name}.{k}", prefix): (f"{site.key_path}.{k}", t)
                for key, site in part.sites.items() for k, t in part.blocks[key].state_dict(keep_vars=True).items()}
    pairs = match_keys(expected, prefix, tensors, weights_path, lambda keys: _hint(keys, hub_name))
    with torch.no_grad():
        for target, value in pairs:  # planned tensors only: not yet in the model
            target.copy_(value)
    return attach_plan


def fusion_files(model: nn.Module, name: str, folder: Path, meta: Mapping[str, Any]) -> FolderFiles:
    """Fusion ``name``'s AdapterHub folder (``meta``: the model keys of every AdapterHub config file)."""
    state = state_of(model)
    config, part = state.require(name), state.model_deltas[name]
    assert isinstance(config, FusionConfig) and isinstance(part, FusionAdapter)
    heads = [key for key, module in saved_modules(model) if name in module.copies]
    if heads:
        raise AdapterFileError(f"cannot save fusion {name!r} in AdapterHub's format: it trained its own copies of {heads} "
                               "(modules_to_save, e.g. a task head), which an AdapterHub fusion folder does not hold. "
                               "Fix: save it with format='peft' (the default). Nothing was written.")
    hub_name = ",".join(config.adapter_names)
    tensors = {f"{site.key_path}.adapter_fusion_layer.{hub_name}.{k}": t.detach().to("cpu").contiguous().clone()
               for key, site in part.sites.items() for k, t in part.blocks[key].state_dict().items()}
    stale = [n for n in (FUSION_WEIGHTS[1], ADAPTER_CONFIG) if (folder / n).exists()]
    if stale:
        raise AdapterFileError(f"cannot save fusion {name!r} to {folder}: it holds {stale} from another save, which a "
                               "reader would take instead of the new fusion (AdapterHub's load_adapter_fusion reads a "
                               ".bin by default; dt.load reads an adapter_config.json first). Fix: remove them, or save "
                               "to another folder. Nothing was written.")
    text = json.dumps({**meta, "adapter_names": list(config.adapter_names), "config": fusion_to_hub(config),
                       "name": hub_name}, indent=2, sort_keys=True)
    return FolderFiles({FUSION_WEIGHTS[0]: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
                        FUSION_CONFIG: lambda p: p.write_text(text, encoding="utf-8")}, first=FUSION_CONFIG)
