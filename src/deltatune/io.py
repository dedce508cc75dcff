"""Save and load adapters in peft's on-disk format, both ways, exactly.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.<peft tensor name>`` with the adapter name left out; the
adapter named "default" goes in the folder itself and every other one in a subfolder named
after it, as peft does. Only safetensors is read from these folders: nothing is ever
unpickled. Loading checks every key and shape before the model is touched, so a bad file
leaves the model exactly as it was. A save replaces a folder's files all or nothing (``files``):
killed at any moment, the folder holds the old adapter or the new one, whole, once any deltatune
call has looked at it again. Other layouts (``formats``) are registered by the methods that have
them: ``load`` reads a folder one of them claims, ``save(..., format=...)`` writes one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import hf, hotswap as swaps
from .config import DeltaConfig, TargetedConfig
from .errors import AdapterFileError, ConfigError
from .files import recover, replace_files
from .formats import PEFT, claiming, format_named, save_folders
from .inject import AttachPlan, apply, plan, shared_tensors, trainable_biases, untied
from .layer import ADAPTER_PARTS, Delta
from .model_card import CARD_NAME, card_text, should_write
from .pretrained import register_saver
from .registry import method_named
from .state import check_name, delta_layers, saved_modules, state_of, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
WHOLE_MODEL_HINT = (" Its model*.safetensors is a whole adapted model's state dict, deltatune's wrapper keys included (what "
                    "accelerate's Accelerator.save_model and save_state write), not an adapter: load it into the same "
                    "adapted model with "
                    "accelerate.utils.load_checkpoint_in_model(model, folder, strict=True) or Accelerator.load_state, "
                    "or write an adapter folder with accelerator.unwrap_model(model).save_pretrained(folder) or dt.save.")
PEFT_ARTIFACTS = ("original_module", "modules_to_save")
"""Path parts peft writes for bias="all" next to modules_to_save; they carry no extra information."""


def adapter_folder(directory: Path, name: str) -> Path:
    """Where adapter ``name`` lives in a saved folder: the root for "default", else a subfolder (as peft).

    The name is checked again here: whatever it is, the folder stays inside ``directory``.
    """
    return directory if name == "default" else directory / check_name(name)


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
    model = unwrap(model)  # a DDP wrapper's names carry "module.", the file's must not
    deltas = {key: layer.delta(name) for key, layer in delta_layers(model) if name in layer.deltas}
    copies = {key: module.copies[name] for key, module in saved_modules(model) if name in module.copies}
    out = {**_by_module_path(deltas, copies, saving), **trainable_biases(model, name)}
    state = state_of(model)
    part, prefix = state.model_deltas.get(name), state.require(name).file_prefix
    parts = {} if part is None else part.tensors_to_save() if saving else part.tensors()
    return {**{prefix + key: t for key, t in out.items()}, **parts}


def gathered(tensor: Tensor) -> Tensor:
    """The whole value of ``tensor``: a sharded one (a DTensor, e.g. under FSDP2's fully_shard) is
    gathered from every rank, which is a collective every rank must join; a plain tensor is itself."""
    from torch.distributed.tensor import DTensor  # imported here: torch.distributed is optional

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _file_tensors(model: nn.Module, name: str) -> tuple[dict[str, Tensor], bool]:
    """Adapter ``name``'s tensors as a file holds them, on the CPU; and whether any was sharded."""
    live = adapter_tensors(model, name, saving=True)
    whole = {k: gathered(t) for k, t in live.items()}
    sharded = any(whole[k] is not t for k, t in live.items())
    return {k: t.detach().to("cpu").contiguous().clone() for k, t in whole.items()}, sharded


def _writes_here(sharded: bool) -> bool:
    """A sharded model is saved by every rank gathering its tensors; rank 0 alone writes them."""
    import torch.distributed as dist

    return not sharded or not dist.is_initialized() or dist.get_rank() == 0


def config_dict(model: nn.Module, name: str) -> dict[str, Any]:
    """The adapter_config.json content peft would write for adapter ``name``."""
    config = state_of(model).require(name)
    data = config.to_peft_dict()
    data["base_model_name_or_path"] = config.base_model_name_or_path or hf.name_or_path(model)
    data["auto_mapping"] = hf.auto_mapping(model, config.task_type)
    data["inference_mode"] = True
    if "modules_to_save" in data:  # peft records the task heads it added
        data["modules_to_save"] = list(config.saved_module_names()) or None
    return dict(sorted(data.items()))


def save(model: nn.Module, directory: str | os.PathLike[str], names: Sequence[str] | None = None,
         format: str = PEFT) -> Path:
    """Save adapters (all by default) under ``directory``; returns it. ``format``: "peft" (peft's folders,
    the default) or a registered layout (``formats``), e.g. "adapters" for AdapterHub's. A peft folder also
    gets a README.md model card (``model_card``), written with the other files, all or nothing; a README.md
    there that deltatune did not write is kept as it is. A model sharded with FSDP2 (DTensor parameters) is
    saved by calling this on every rank: each gathers the adapter, rank 0 writes the usual folder."""
    model = unwrap(model)
    state = state_of(model)
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise AdapterFileError(f"cannot save adapters to {root}: it is a file, not a folder. Pass a folder path.")
    chosen = list(state.configs) if names is None else list(names)
    if format != PEFT:
        layout = format_named(format)
        for name in chosen:
            state.require(name)
        save_folders(layout, model, root, chosen)
        return root
    for name in chosen:
        state.require(name)
    # every config first: one that peft's format cannot hold is refused before any folder is written
    configs = {name: config_dict(model, name) for name in chosen}
    texts = {name: json.dumps(data, indent=2) + "\n" for name, data in configs.items()}
    copies = {name: _copied_folders(root, name, chosen, state.require(name)) for name in chosen}
    files = {name: _file_tensors(model, name) for name in chosen}  # every rank gathers, in the same order
    if not _writes_here(any(sharded for _, sharded in files.values())):
        return root
    for name in chosen:
        folder = adapter_folder(root, name)
        for sub, contents in copies[name].items():  # before the config that names them
            replace_files(folder / sub, {file: _bytes_writer(data) for file, data in contents.items()},
                          first=CONFIG_NAME)
        tensors = files[name][0]
        text = texts[name]
        writers: dict[str, Callable[[Path], object]] = {
            WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
            CONFIG_NAME: lambda p: p.write_text(text, encoding="utf-8"),
        }
        if should_write(folder):  # a README.md the user wrote stays as it is (model_card)
            card = card_text(configs[name], name, _version(), hf.is_transformers_model(model))
            writers[CARD_NAME] = lambda p: p.write_text(card, encoding="utf-8")
        replace_files(folder, writers, first=CONFIG_NAME)
    return root


def _copied_folders(root: Path, name: str, chosen: Sequence[str], config: DeltaConfig) -> dict[str, dict[str, bytes]]:
    """The adapter folders ``config`` keeps inside its own (``saved_folders``): subfolder -> file -> bytes,
    all read before anything is written (the source may be the folder being saved over)."""
    out: dict[str, dict[str, bytes]] = {}
    for sub, source in config.saved_folders().items():
        folder = adapter_folder(root, name)
        target = folder / sub
        clash = [other for other in chosen if _clashes(target, folder, adapter_folder(root, other))]
        if clash:
            raise AdapterFileError(f"cannot save adapter {name!r}: it keeps a copy of {source} in {target}, which is "
                                   f"adapter {clash[0]!r}'s folder. Save them to separate folders (names=[...]).")
        missing = [file for file in (CONFIG_NAME, WEIGHTS_NAME) if not (source / file).is_file()]
        if missing:
            raise AdapterFileError(f"cannot save adapter {name!r}: it keeps a copy of the adapter folder {source}, "
                                   f"which has no {missing[0]} any more. Restore that folder, then save again.")
        out[sub] = {file: (source / file).read_bytes() for file in (CONFIG_NAME, WEIGHTS_NAME)}
    return out


def _clashes(target: Path, folder: Path, other: Path) -> bool:
    """Whether ``target`` (a subfolder of ``folder``) overlaps another adapter's folder ``other`` that
    does not hold ``folder`` itself (the root, where "default" is saved, holds every named one)."""
    return not folder.is_relative_to(other) and (target.is_relative_to(other) or other.is_relative_to(target))


def _bytes_writer(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)


def _version() -> str:
    """deltatune's installed version, for the model card (importing the package here would be circular)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deltatune")
    except PackageNotFoundError:
        return "unknown"


register_saver(save)  # what a model's save_pretrained writes while it carries adapters (pretrained)


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
        hint += WHOLE_MODEL_HINT if _holds_adapted_state_dict(folder, found) else ""
        raise AdapterFileError(f"no {CONFIG_NAME} found: {where}.{hint} Pass the folder that dt.save or peft wrote.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); the file is corrupt.") from err
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterFileError(f"{path} has no 'peft_type' key; it is not an adapter config.")
    config_class = method_named(str(data["peft_type"]), str(path)).config_class
    try:
        config = config_class.from_peft_dict(data, str(path))
    except (ConfigError, TypeError) as err:
        raise AdapterFileError(f"{path}: {err}") from err
    return config.located(folder)  # paths it holds relative to its folder work from anywhere


def _holds_adapted_state_dict(folder: Path, found: list[str]) -> bool:
    """Whether ``folder`` holds a whole adapted model's state dict (keys under ``ADAPTER_PARTS``): what
    accelerate writes, which only the same adapted model can load. Reads the key list, not the tensors."""
    for name in (n for n in found if n.startswith("model") and n.endswith(".safetensors")):
        try:
            with safe_open(str(folder / name), "pt") as file:
                keys = list(file.keys())
        except (SafetensorError, OSError):
            continue
        if any(part in ADAPTER_PARTS for key in keys for part in key.split(".")[:-1]):
            return True
    return False


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
        if any(p in ADAPTER_PARTS for p in parts[:-1]):
            continue
        out[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = param
    return out


def _base_overrides(model: nn.Module, attach_plan: AttachPlan) -> dict[str, nn.Parameter]:
    """Base parameters a peft file may carry for this config: the biases it trains, and the
    full table of an embedding it targets (peft's ``save_embedding_layers="auto"``)."""
    config = attach_plan.config
    uses_bias = isinstance(config, TargetedConfig) and config.trained_biases() != "none"
    targeted = {id(view.weight) for view in attach_plan.views.values()}
    tables = {id(getattr(m, "weight", None)) for m in hf.embedding_modules(model)} & targeted
    if not uses_bias and not tables:  # the common case: no walk over every parameter of the model
        return {}
    return {name: p for name, p in _base_params(model).items()
            if (uses_bias and name.endswith("bias")) or id(p) in tables}


def _is_saved_module_artifact(key: str, attach_plan: AttachPlan) -> bool:
    """Whether ``key`` is a copy peft writes beside a saved module (its ``original_module`` or
    ``modules_to_save`` bias under bias="all") of a module this adapter does save."""
    parts = key.split(".")
    cut = next((i for i, p in enumerate(parts[:-1]) if p in PEFT_ARTIFACTS), None)
    return cut is not None and ".".join(parts[:cut]) in attach_plan.saved


def _differing_ties(attach_plan: AttachPlan, tensors: Mapping[str, Tensor]) -> list[str]:
    """File keys that fill one tensor shared by the plan's saved copies (``shared_tensors``) but hold
    different values (a folder saved before full fine-tuning kept ties: they trained apart); the first such group."""
    prefix = attach_plan.config.file_prefix
    for group in shared_tensors(attach_plan.saved):
        values = [tensors[prefix + key] for key in group if prefix + key in tensors]  # _match reports missing keys
        if any(v.dtype != values[0].dtype or not torch.equal(v, values[0]) for v in values[1:]):
            return [prefix + key for key in group]
    return []


LOAD_SHAPE_HINT = "check r, rank_pattern and that this adapter was made for this model"


def _match(model: nn.Module, attach_plan: AttachPlan, tensors: dict[str, Tensor], source: Path,
           hint: str = LOAD_SHAPE_HINT) -> list[tuple[Tensor, Tensor]]:
    """Pair every file tensor with the planned tensor it fills (returned) or the base tensor it
    overwrites (put in ``attach_plan.base_writes``, for ``apply`` to write and removal to undo);
    raise on any key the config does not account for, or any shape mismatch (saying ``hint``).
    The plan may be a new adapter's or, for a swap, an existing one's live tensors (``hotswap.slot``)."""
    prefix = attach_plan.config.file_prefix
    expected = {prefix + k: t for k, t in _by_module_path(attach_plan.deltas, attach_plan.saved).items()}
    expected.update(attach_plan.model_delta.tensors() if attach_plan.model_delta is not None else {})
    base = _base_overrides(model, attach_plan)
    pairs, unexpected = [], []
    for file_key, value in tensors.items():
        target = expected.pop(file_key, None)
        key = file_key[len(prefix):] if file_key.startswith(prefix) else None
        if target is None and key is not None and _is_saved_module_artifact(key, attach_plan):
            continue
        base_key = key.replace(".base_layer.", ".") if target is None and key is not None else None
        if base_key is not None:
            target = base.get(base_key)
        if target is None:
            unexpected.append(file_key)
            continue
        if target.shape != value.shape:
            raise AdapterFileError(
                f"{source}: tensor {file_key!r} has shape {tuple(value.shape)} but the model needs "
                f"{tuple(target.shape)} there ({hint}). "
                "The model was left unchanged."
            )
        if base_key is not None:
            attach_plan.base_writes[base_key] = (target, value)
        else:
            pairs.append((target, value))
    if unexpected:
        raise AdapterFileError(
            f"{source}: {len(unexpected)} tensor(s) that the config does not account for, e.g. {unexpected[:3]}. "
            "Either the adapter was made for a different model or config, or the file carries base weights "
            "(such as an embedding table) for modules the config does not target. The model was left unchanged."
        )
    if expected:
        raise AdapterFileError(
            f"{source}: missing tensor(s) {list(expected)[:3]} "
            f"({len(expected)} in all) that the config's targets need. The model was left unchanged."
        )
    return pairs


def load(model: nn.Module, directory: str | os.PathLike[str], name: str = "default",
         trainable: bool = False, replace: bool = False) -> nn.Module:
    """Load an adapter folder (written by deltatune or peft, or in a registered layout) into ``model`` as ``name``.

    The adapter is frozen unless ``trainable``; it becomes active if no adapter was active.
    ``replace``: ``name`` is already loaded and the folder's adapter replaces its values in place, keeping
    its tensor objects (a hot-swap, see ``hotswap``).
    Every check happens before the model changes: on any error the model is as it was.
    """
    folder = Path(directory)
    if replace:
        _swap(swaps.unwrapped(model), folder, name, trainable)
        return model
    recover(folder)  # a save killed past its commit point is finished first
    layout = claiming(folder)
    if layout is not None:  # its reader checks everything and fills a plan; the model is untouched until apply
        apply(model, layout.read(model, folder, name, trainable))
        return model
    config = _read_loadable_config(folder, trainable)
    tensors = read_tensors(folder)
    attach_plan = plan(model, config, name)
    if _differing_ties(attach_plan, tensors):
        attach_plan.saved = untied(attach_plan.saved)  # a folder trained untied loads as it was trained
    pairs = _match(model, attach_plan, tensors, folder / WEIGHTS_NAME)
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    apply(model, attach_plan)
    return model


def _read_loadable_config(folder: Path, trainable: bool) -> DeltaConfig:
    """The folder's config, in inference mode unless ``trainable``; refused when it cannot train in this form."""
    config = read_config(folder).replace(inference_mode=not trainable)
    if trainable and not config.loads_trainable():
        raise AdapterFileError(
            f"{folder}: this {config.peft_type} adapter's file holds what its trained encoder computed, not the encoder, "
            "so it cannot be trained further in this form; load it frozen (trainable=False), or attach a new adapter "
            "whose saved tensors are its trained ones and start it from these values. The model was left unchanged.")
    return config


def hotswap(model: nn.Module, directory: str | os.PathLike[str], name: str = "default",
            trainable: bool = False) -> nn.Module:
    """Replace loaded adapter ``name``'s values in place with the adapter in ``directory``; returns ``model``.

    The same as ``load(model, directory, name, trainable, replace=True)``. The adapter keeps its modules
    and its tensor objects (an optimizer or server holding them keeps working; a compiled model, which
    may be passed itself, does not recompile); its config becomes the folder's. The folder's adapter must
    be of the same method on the same layers with the same shapes; a method that pads ranks also takes a
    smaller rank (and, after ``dt.prepare_hotswap(model, target_rank=R)``, any rank up to R). It is frozen
    unless ``trainable``. Every check happens before the first write: on any error the model is as it was.
    """
    return load(model, directory, name, trainable, replace=True)


def _swap(model: nn.Module, folder: Path, name: str, trainable: bool) -> None:
    """The hot-swap: the folder read and checked as a load reads it, its tensors matched against the live
    tensors of adapter ``name`` (instead of a new plan's), then written in place."""
    state_of(model).require(name)
    recover(folder)
    layout = claiming(folder)
    if layout is not None:
        raise AdapterFileError(
            f"{folder} is in the {layout.name!r} layout; a hot-swap reads peft's layout. Fix: load it once under a "
            "new name and save that in peft's layout (dt.load(model, folder, name='tmp'); "
            "dt.save(model, out, ['tmp'])), then swap from the folder dt.save wrote. The model was left unchanged.")
    config = _read_loadable_config(folder, trainable)
    source = folder / WEIGHTS_NAME
    attach_plan = swaps.slot(model, name, config, str(folder / CONFIG_NAME))
    tensors = read_tensors(folder)
    swaps.check_layers(attach_plan, tensors, str(source))
    tensors = swaps.fit_ranks(attach_plan, tensors, str(source))
    differing = _differing_ties(attach_plan, tensors)
    if differing:
        raise AdapterFileError(
            f"{source}: the tensors {differing[0]} fill one tensor that adapter {name!r}'s saved copies share (tied, as "
            "in the base model), but hold different values: this folder was trained with them untied. Load it under a "
            "new name instead of swapping it in (dt.load(model, folder, name=...)). The model was left unchanged.")
    pairs = _match(model, attach_plan, tensors, source, hint=swaps.SHAPE_HINT)
    swaps.commit(model, attach_plan, pairs)
