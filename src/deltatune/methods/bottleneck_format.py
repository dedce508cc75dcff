"""AdapterHub's adapter folders (``adapters`` 1.x) for bottleneck adapters, read and written exactly.

A folder holds ``adapter_config.json`` (``config``: AdapterHub's ``BnConfig`` dict; ``hidden_size``,
``model_class``, ``model_name``, ``model_type``, ``name``, ``version``) and ``adapter.safetensors`` or the
pickled ``pytorch_adapter.bin``; weight keys are ``<site key path>.adapters.<name>.<AdapterHub local key>``
(``BottleneckBlock.adapterhub_keys``; with ``ln_before`` the input norm is stored twice, under
``adapter_norm_before`` and ``adapter_down.0``). The base-model prefix (``bert.``, ``transformer.``,
``model.``) is optional, as in AdapterHub: keys are compared without it. Reading is as strict as peft's
loader: every key must land in a block and every block tensor be filled, with equal shapes, all before
the model changes. AdapterFusion folders (``adapter_fusion_config.json``) go to ``fusion_hub``. Registered as
the folder format "adapters" (``formats``); see docs/adapterhub.md.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import hf
from ..config import DeltaConfig
from ..errors import AdapterFileError
from ..formats import FolderFiles, FolderFormat, register_format
from ..inject import AttachPlan, plan
from ..registry import method_for
from ..sites import Site
from ..state import check_name, saved_modules, state_of
from .bottleneck import BnConfig, BottleneckAdapter
from .bottleneck_block import BottleneckBlock
from .bottleneck_hub import from_hub, to_hub
from .bottleneck_hub_files import (HEAD_CONFIG, HEAD_WEIGHTS, Head, head_config, head_pairs, legacy, match_keys,
                                   read_head, read_json, read_weights, without_prefix)
from .fusion import FusionConfig
from .fusion_hub import FUSION_CONFIG, fusion_files, read_fusion

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
VERSION = "adapters.1.3.0"
"""The AdapterHub version whose layout is written (and that the oracle tests check against)."""
OTHER_PARTS = {"adapter_fusion_layer": "AdapterFusion weights", "invertible_adapters": "an invertible adapter",
               "prefix_tunings": "prefix tuning", "loras": "LoRA", "refts": "ReFT", "prompt_tuning": "prompt tuning"}
"""Key parts of AdapterHub methods deltatune does not read from these folders, for a precise error."""
C = TypeVar("C", bound=DeltaConfig)
T5_BASE = ("encoder", "decoder", "shared")
"""What AdapterHub's head saver counts as the base model of a T5 (its classes have no base-model attribute)."""


def claims(folder: Path) -> bool:
    """An AdapterHub folder: its adapter_config.json has ``config`` and no ``peft_type`` (or it is a fusion folder)."""
    path = folder / CONFIG
    if not path.is_file():
        return (folder / FUSION_CONFIG).is_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return False  # peft's reader reports the broken file
    return isinstance(data, dict) and "peft_type" not in data and ("config" in data or "model_class" in data)


def _site_blocks(part: BottleneckAdapter) -> list[tuple[Site, BottleneckBlock]]:
    """Each site of an adapter with its block."""
    out = []
    for key, site in part.sites.items():
        block = part.blocks[key]
        assert isinstance(block, BottleneckBlock)
        out.append((site, block))
    return out


def _expected(part: BottleneckAdapter, hub_name: str, prefix: str | None) -> dict[str, tuple[str, Tensor]]:
    """File key (without the prefix) -> (deltatune's name for the tensor, the planned tensor it fills)."""
    out = {}
    for site, block in _site_blocks(part):
        live = block.state_dict(keep_vars=True)
        for ours, locals_ in block.adapterhub_keys().items():
            for local in locals_:
                file_key = without_prefix(f"{site.key_path}.adapters.{hub_name}.{local}", prefix)
                out[file_key] = (f"{site.key_path}.{ours}", live[ours])
    return out


def _unexpected_hint(keys: list[str], hub_name: str) -> str:
    names = sorted({m.group(1) for k in keys if (m := re.search(r"\.adapters\.([^.]+)\.", k))} - {hub_name})
    parts = sorted({what for k in keys for part, what in OTHER_PARTS.items() if f"{part}." in k})
    hint = f" The keys name adapter(s) {names}, the config {hub_name!r}." if names else ""
    return hint + (f" They hold {', '.join(parts)}, which deltatune does not read from AdapterHub folders." if parts else "")


@dataclass(frozen=True)
class HubFolder:
    """What every AdapterHub adapter folder holds besides its method's config: read and checked, nothing changed."""

    meta: dict[str, Any]
    hub_name: str
    """The adapter name the file's keys are stored under."""
    tensors: dict[str, Tensor]
    source: Path
    head: Head


def open_folder(model: nn.Module, folder: Path) -> HubFolder:
    """The folder's adapter_config.json, weights and head decision (``read_head``) for ``model``."""
    meta = read_json(folder / CONFIG)
    hub_name = meta.get("name")
    if not isinstance(hub_name, str) or not hub_name:
        raise AdapterFileError(f"{folder / CONFIG}: no adapter 'name' (the file's keys are stored under it); the file is corrupt.")
    weights = read_weights(folder, WEIGHTS)
    if weights is None:
        raise AdapterFileError(f"{folder} has neither {WEIGHTS[0]} nor {WEIGHTS[1]}; pass the folder AdapterHub's save_adapter wrote.")
    if meta.get("model_type") not in (None, hf.model_type(model)):
        warnings.warn(f"{folder / CONFIG}: the adapter was saved from a {meta.get('model_type')!r} model and is loaded "
                      f"into a {hf.model_type(model)!r} one; it loads if its sites and shapes fit; check that this is intended.",
                      stacklevel=4)
    return HubFolder(meta, hub_name, weights[0], weights[1], read_head(model, folder))


def with_folder(config: C, opened: HubFolder, trainable: bool) -> C:
    """``config`` as loaded from ``opened``: frozen unless ``trainable``, carrying the head it brought, named after
    the model it was saved from."""
    source_model = opened.meta.get("model_name")
    return config.replace(inference_mode=not trainable, modules_to_save=opened.head.modules or None,
                          base_model_name_or_path=source_model if isinstance(source_model, str) and source_model else None)


def read(model: nn.Module, folder: Path, name: str, trainable: bool) -> AttachPlan:
    """An AdapterHub folder -> a filled attach plan for adapter ``name`` (a fusion folder: ``fusion_hub``); the
    model is not touched."""
    if not (folder / CONFIG).is_file():
        return read_fusion(model, folder, name, trainable)
    opened = open_folder(model, folder)
    meta, hub_name = opened.meta, opened.hub_name
    inverse = any("invertible_adapters." in legacy(k) for k in opened.tensors)
    config = from_hub(meta.get("config"), str(folder / CONFIG), "version" in meta, inverse, meta.get("type") == "text_task")
    attach_plan = plan(model, with_folder(config, opened, trainable), name)
    part = attach_plan.model_delta
    assert isinstance(part, BottleneckAdapter)
    prefix = hf.base_model_prefix(model)
    pairs = match_keys(_expected(part, hub_name, prefix), prefix, opened.tensors, opened.source,
                       lambda keys: _unexpected_hint(keys, hub_name))
    pairs += head_pairs(attach_plan, opened.head, folder) if opened.head.modules else []
    with torch.no_grad():
        for target, value in pairs:  # planned tensors only: not yet in the model
            target.copy_(value)
    return attach_plan


def _meta(model: nn.Module) -> dict[str, Any]:
    """The model keys AdapterHub writes in every config file."""
    return {"hidden_size": hf.hidden_size(model), "model_class": type(model).__name__,
            "model_name": hf.name_or_path(model) or "", "model_type": hf.model_type(model), "version": VERSION}


def _cpu(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu").contiguous().clone()  # a separate tensor per key: safetensors refuses shared ones


def _check_destination(folder: Path, has_head: bool) -> None:
    """Refuse a folder whose leftover files a reader would pair with the new adapter."""
    stale = [WEIGHTS[1]] + ([] if has_head else [HEAD_CONFIG, *HEAD_WEIGHTS])
    found = [n for n in stale if (folder / n).exists()]
    if found:
        raise AdapterFileError(f"cannot save to {folder}: it holds {found} from another save, which a reader would "
                               "take with the new adapter (AdapterHub's load_adapter reads a .bin by default). "
                               "Fix: remove them, or save to another folder. Nothing was written.")


def _check_head_modules(model: nn.Module, name: str, paths: list[str]) -> None:
    """AdapterHub's head files hold whole modules outside the base model (its loader drops the rest): refuse an
    adapter whose ``modules_to_save`` copies are anything else, rather than write what AdapterHub would lose."""
    base = {hf.base_model_prefix(model), *(T5_BASE if hf.model_type(model) in ("t5", "mt5") else ())}
    wrong = [p for p in paths if "." in p or p in base]
    if wrong:
        raise AdapterFileError(
            f"cannot save adapter {name!r} in AdapterHub's format: its own copies of {wrong} (modules_to_save) lie inside "
            "the base model or inside a head module, and AdapterHub's head files hold whole modules outside the base "
            "model only (e.g. 'classifier'), so AdapterHub would drop them. Fix: save it with format='peft' (the "
            "default), or keep modules_to_save to whole head modules. Nothing was written.")


def folder_files(model: nn.Module, name: str, folder: Path, hub_config: dict[str, Any],
                 tensors: dict[str, Tensor]) -> FolderFiles:
    """An AdapterHub adapter folder: adapter_config.json (``hub_config`` as its ``config``), adapter.safetensors
    (``tensors``, by model key), and the head files when the adapter carries its own copy of a head
    (``modules_to_save``); refused, before anything is written, where AdapterHub would read it otherwise."""
    carried = {path: module.copies[name] for path, module in saved_modules(model) if name in module.copies}
    _check_head_modules(model, name, list(carried))
    head = {f"{path}.{k}": _cpu(t) for path, copy in carried.items() for k, t in copy.state_dict().items()}
    _check_destination(folder, bool(head))
    meta = _meta(model)
    text = json.dumps({**meta, "config": hub_config, "name": name}, indent=2, sort_keys=True)
    saved = {k: _cpu(t) for k, t in tensors.items()}
    writers = {WEIGHTS[0]: lambda p: save_file(saved, p, metadata={"format": "pt"}),
               CONFIG: lambda p: p.write_text(text, encoding="utf-8")}
    if head:
        head_text = json.dumps(head_config(model, meta), indent=2, sort_keys=True)
        writers[HEAD_WEIGHTS[0]] = lambda p: save_file(head, p, metadata={"format": "pt"})
        writers[HEAD_CONFIG] = lambda p: p.write_text(head_text, encoding="utf-8")
    return FolderFiles(writers, first=CONFIG)


def files(model: nn.Module, name: str, folder: Path) -> FolderFiles:
    """Adapter ``name``'s AdapterHub folder (``folder_files``); a fusion's: ``fusion_hub``. Prefix and prompt
    tuning adapters are written by ``prompt_hub`` (a part of this layout)."""
    state = state_of(model)
    config = state.require(name)
    if isinstance(config, FusionConfig):
        return fusion_files(model, name, folder, _meta(model))
    if not isinstance(config, BnConfig):
        raise AdapterFileError(
            f"cannot save adapter {name!r} in AdapterHub's format: it is a {method_for(config).peft_type} adapter "
            f"({type(config).__name__}), and format='adapters' writes bottleneck adapters (dt.BnConfig and its presets), "
            "their fusions (dt.FusionConfig) and prefix / prompt tuning adapters only. Fix: save it with format='peft' "
            "(the default).")
    part = state.model_deltas[name]
    assert isinstance(part, BottleneckAdapter)
    tensors = {f"{site.key_path}.adapters.{name}.{local}": block.state_dict()[ours]
               for site, block in _site_blocks(part)
               for ours, locals_ in block.adapterhub_keys().items() for local in locals_}
    return folder_files(model, name, folder, to_hub(config), tensors)


def folder_for(root: Path, name: str, names: Sequence[str]) -> Path:
    """One adapter: ``root`` itself; several: a subfolder per adapter (AdapterHub keeps one adapter per folder)."""
    return root if len(names) == 1 else root / check_name(name)


ADAPTERHUB = register_format(FolderFormat("adapters", claims, read, files, folder_for))
