"""Hot-swap: replace a loaded adapter's values in place with those of another adapter folder.

The adapter keeps its name, its modules and its tensor objects (same ``nn.Parameter``s, same
storage): an optimizer or a serving loop that holds them keeps working, and a ``torch.compile``d
model runs on without recompiling. ``io.load(..., replace=True)`` (``dt.hotswap``) reads the folder
and pairs its tensors with the slot's live ones through the same matching as a load; this module
holds the parts that are not file reading: what the slot is, what may differ between the slot's
config and the folder's, fitting a smaller rank into a larger slot, and the write itself.

Two small capabilities let a method take part beyond a plain copy at equal shapes; a delta class
declares one by having its methods, generic code finds it with a protocol check (cached per class)
and never asks which method a delta belongs to:

- ``Retunable``: a delta whose forward also reads settings from the config (a scale, a rank). It
  says which config fields may differ in a swap, applies the new ones in place, and can hold its
  numbers in tensors so that new values do not make compiled code recompile.
- ``PaddedRank``: a factor-form delta whose rank axis can hold zeros without changing its output.
  ``prepare_hotswap(model, target_rank=R)`` pads every such slot to rank ``R``; a swap then copies a
  rank-``r`` adapter (``r <= R``) into the top-left of the slot and zeros the rest.

Everything is checked before the first write: a refused swap leaves the model bit for bit as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .config import DeltaConfig
from .values import is_positive_int
from .errors import AdapterError, AdapterFileError
from .inject import AttachPlan, trainable_biases
from .layer import Delta
from .state import ModelState, delta_layers, saved_modules, state_of

METADATA_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode"})
"""Config fields that describe an adapter without changing what it computes: they may differ."""
SELECTION_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})
"""Config fields that select layers: they may be spelled differently as long as the folder's tensors
cover exactly the slot's layers (checked from the tensors, ``check_layers``)."""
SHAPE_HINT = ("a swap keeps the slot's shapes: the folder's adapter must have them, except a smaller rank where "
              "the method pads ranks; for a larger rank call dt.prepare_hotswap(model, target_rank=<the largest "
              "rank you will swap in>) after loading the first adapter and before compiling")
"""What ``io._match`` says after a shape mismatch in a swap."""


@runtime_checkable
class Retunable(Protocol):
    """A delta whose forward reads settings from its config beyond its tensors (e.g. a scale)."""

    def retunable_fields(self, slot: DeltaConfig, new: DeltaConfig) -> frozenset[str]:
        """The config fields in which ``new`` may differ from ``slot`` (this delta's config) for ``retune``
        to take it in place."""
        ...

    def hold_settings_in_tensors(self) -> None:
        """Keep the numbers forward reads from the config in tensors (buffers) instead of Python numbers,
        so that ``retune`` changes values, not constants compiled code was specialised on. Same outputs."""
        ...

    def retune(self, config: DeltaConfig, key: str) -> None:
        """Take ``config``'s settings for the layer named ``key`` in place. Called only after every check
        passed (``retunable_fields``, ``PaddedRank.fit_rank``); cannot fail."""
        ...


@runtime_checkable
class PaddedRank(Protocol):
    """A factor-form delta whose rank axis can be padded with zeros without changing its output."""

    def slot_rank(self) -> int:
        """The rank its factors have room for (their size along the rank axis)."""
        ...

    def pad_rank(self, target: int) -> None:
        """Grow the factors to rank ``target`` (>= ``slot_rank()``) with zeros: same outputs, new tensors."""
        ...

    def fit_rank(self, values: Mapping[str, Tensor], config: DeltaConfig, key: str, where: str) -> dict[str, Tensor]:
        """``values`` (this delta's tensors by their names in ``tensors()``, from a folder whose config is
        ``config``, for the layer ``key``) padded with zeros to the slot's rank. Raises AdapterFileError,
        naming ``where``, for a rank larger than the slot's or one that disagrees with ``config``; values it
        cannot read as factors are returned as they are, for the shape check to report."""
        ...


_CAPABLE: dict[tuple[type, type], bool] = {}
"""(delta class, capability) -> whether the class has it: a protocol check inspects every member each
time, and a swap asks for every layer, so each class is checked once."""


def _class_has(cls: type, capability: type) -> bool:
    if (cls, capability) not in _CAPABLE:
        _CAPABLE[(cls, capability)] = issubclass(cls, capability)
    return _CAPABLE[(cls, capability)]


def as_retunable(delta: Delta) -> Retunable | None:
    """``delta`` as a ``Retunable``, or None when its class is not one."""
    return delta if _class_has(type(delta), Retunable) else None  # type: ignore[return-value]


def as_padded_rank(delta: Delta) -> PaddedRank | None:
    """``delta`` as a ``PaddedRank``, or None when its class is not one."""
    return delta if _class_has(type(delta), PaddedRank) else None  # type: ignore[return-value]


def unwrapped(model: nn.Module) -> nn.Module:
    """The model a ``torch.compile`` wrapper runs (its ``_orig_mod``), or ``model`` itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _deltas_of(model: nn.Module, names: Iterable[str]) -> list[tuple[str, str, Delta]]:
    """(adapter name, layer path, delta) of every layer delta of the named adapters."""
    wanted = set(names)
    return [(name, key, layer.delta(name)) for key, layer in delta_layers(model)
            for name in layer.deltas if name in wanted]


def prepare_hotswap(model: nn.Module, target_rank: int | None = None, names: Sequence[str] | None = None) -> nn.Module:
    """Ready the loaded adapters (all, or ``names``) for swaps into a compiled model; returns ``model``.

    Every delta that reads settings from its config keeps them in tensors from now on (a swap to a new
    scale then changes a value, not a constant the compiled code depends on); with ``target_rank``, every
    factor-form delta is padded with zeros to that rank, so that adapters of any rank up to it fit its
    slot. Outputs do not change. Call it after loading the first adapter and before ``torch.compile`` and
    before building an optimizer: padding makes new, larger tensors. Checked in full before any change.
    """
    if unwrapped(model) is not model:
        raise AdapterError("prepare_hotswap: this model is already compiled; the new tensor shapes would make it "
                           "recompile. Call dt.prepare_hotswap on the model before torch.compile(model).")
    state = state_of(model)
    chosen = list(state.configs) if names is None else list(names)
    for name in chosen:
        state.require(name)
    deltas = _deltas_of(model, chosen)
    padded = [(name, key, p) for name, key, d in deltas if (p := as_padded_rank(d)) is not None]
    if target_rank is not None:
        _check_target_rank(target_rank, chosen, padded)
    for retuned in (as_retunable(d) for _, _, d in deltas):
        if retuned is not None:
            retuned.hold_settings_in_tensors()
    if target_rank is not None:
        for _, _, slot_delta in padded:
            slot_delta.pad_rank(target_rank)
    return model


def _check_target_rank(target: int, chosen: list[str], padded: Sequence[tuple[str, str, PaddedRank]]) -> None:
    if not is_positive_int(target):
        raise AdapterError(f"prepare_hotswap: target_rank={target!r} must be a positive integer, e.g. 16")
    if not padded:
        raise AdapterError(f"prepare_hotswap: target_rank={target}, but no layer of adapters {chosen} has a rank to "
                           "pad (their tensors have fixed shapes and swap by plain copy). Fix: drop target_rank.")
    larger = [(name, key, d.slot_rank()) for name, key, d in padded if d.slot_rank() > target]
    if larger:
        name, key, rank = max(larger, key=lambda item: item[2])
        raise AdapterError(f"prepare_hotswap: target_rank={target} is smaller than the rank adapter {name!r} already "
                           f"holds on {key!r} ({rank}; {len(larger)} layer(s) in all). "
                           f"Fix: pass target_rank >= {rank}, the largest rank you will swap in.")


def slot(model: nn.Module, name: str, config: DeltaConfig, source: str) -> AttachPlan:
    """Adapter ``name`` as an attach plan of its live modules (what the folder's tensors are matched
    against) with ``config``, the folder's; raises unless ``config`` can replace the slot's in place."""
    state = state_of(model)
    current = state.require(name)
    layers = {key: layer for key, layer in delta_layers(model) if name in layer.deltas}
    merged = sorted(key for key, layer in layers.items() if name in layer.merged)
    if merged:
        raise AdapterError(f"cannot swap adapter {name!r}: it is merged into the weights of {len(merged)} layer(s), "
                           f"e.g. {merged[:2]}; a swap would leave the old values in them. "
                           "Fix: dt.unmerge(model) first.")
    deltas = {key: layer.delta(name) for key, layer in layers.items()}
    check_config(current, config, deltas.values(), name, source, model_level=name in state.model_deltas)
    return AttachPlan(name, config, deltas=deltas, views={key: layer.view for key, layer in layers.items()},
                      saved={key: m.copies[name] for key, m in saved_modules(model) if name in m.copies},
                      model_delta=state.model_deltas.get(name))


def check_config(current: DeltaConfig, new: DeltaConfig, deltas: Iterable[Delta], name: str, source: str,
                 model_level: bool = False) -> None:
    """Refuse ``new`` unless it is the slot's method and differs from ``current`` only in fields that
    describe it (``METADATA_FIELDS``), that select the same layers (``SELECTION_FIELDS``) or that every
    delta of the slot can take in place (``Retunable.retunable_fields``). ``task_type`` may differ where it
    changes nothing computed: the same saved modules (task heads) and no model-level part (``model_level``:
    such a part, e.g. virtual tokens, may treat each task differently)."""
    if type(new) is not type(current):
        raise AdapterFileError(f"{source}: the folder holds a {new.peft_type} adapter but adapter {name!r} is "
                               f"{current.peft_type}; a swap keeps the method and the modules. Fix: load it under "
                               "a new name, dt.load(model, folder, name=...).")
    allowed = _retunable(list(deltas), current, new)
    same_heads = not model_level and current.saved_module_names() == new.saved_module_names()
    free = METADATA_FIELDS | SELECTION_FIELDS | allowed | ({"task_type"} if same_heads else set())
    differ = [f.name for f in dataclasses.fields(current)
              if f.name not in free and getattr(current, f.name) != getattr(new, f.name)]
    if differ:
        values = "; ".join(f"{f}: {getattr(current, f)!r} in the slot, {getattr(new, f)!r} in the folder"
                           for f in differ)
        may = f"only {sorted(allowed)} and the adapter's description may differ" if allowed else \
            "its settings must be equal, only its values and description may differ"
        raise AdapterFileError(f"{source}: the folder's config differs from adapter {name!r}'s where a swap cannot "
                               f"follow ({values}); for this slot {may}. Fix: load it under a new name, "
                               "dt.load(model, folder, name=...). The model was left unchanged.")


def _retunable(deltas: list[Delta], current: DeltaConfig, new: DeltaConfig) -> frozenset[str]:
    """The fields every delta of the slot can take in place (none when some delta cannot retune)."""
    retuned = [as_retunable(d) for d in deltas]
    if not retuned or any(r is None for r in retuned):
        return frozenset()
    return frozenset.intersection(*(r.retunable_fields(current, new) for r in retuned if r is not None))


def _layer_of(file_key: str, prefix: str, names: Iterable[str]) -> str | None:
    """The layer path of a file key ``<prefix><layer>.<tensor name>`` for one of the tensor ``names``."""
    if not file_key.startswith(prefix):
        return None
    rest = file_key[len(prefix):]
    return next((rest[:-len(n) - 1] for n in names if rest.endswith(f".{n}") and len(rest) > len(n) + 1), None)


def check_layers(attach_plan: AttachPlan, tensors: Mapping[str, Tensor], source: str) -> None:
    """Refuse a folder whose layer tensors do not cover exactly the slot's layers (a swap adds and removes
    no layer), with the layers that differ; other mismatches are left to the tensor matching."""
    names = {n for delta in attach_plan.deltas.values() for n in delta.tensors()}
    found = {layer for key in tensors if (layer := _layer_of(key, attach_plan.config.file_prefix, names)) is not None}
    extra, missing = sorted(found - set(attach_plan.deltas)), sorted(set(attach_plan.deltas) - found)
    if extra or missing:
        raise AdapterFileError(
            f"{source}: the folder's adapter targets other layers than adapter {attach_plan.name!r}: "
            f"{len(extra)} layer(s) the slot does not have (e.g. {extra[:2]}) and {len(missing)} of the slot's "
            f"missing (e.g. {missing[:2]}). A swap keeps the slot's layers. Fix: swap in an adapter trained with "
            "the same target modules and layers, or load it under a new name. The model was left unchanged.")


def fit_ranks(attach_plan: AttachPlan, tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``tensors`` with every rank-padded slot's values padded to its rank (``PaddedRank.fit_rank``)."""
    out = dict(tensors)
    prefix = attach_plan.config.file_prefix
    for key, delta in attach_plan.deltas.items():
        slot_delta = as_padded_rank(delta)
        if slot_delta is None:
            continue
        file_keys = {name: f"{prefix}{key}.{name}" for name in delta.tensors()}
        values = {name: out[k] for name, k in file_keys.items() if k in out}
        fitted = slot_delta.fit_rank(values, attach_plan.config, key, f"{source}: layer {key!r}")
        out.update({file_keys[name]: value for name, value in fitted.items()})
    return out


def commit(model: nn.Module, attach_plan: AttachPlan, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Write a checked swap: every value into its live tensor, the new settings into the deltas, the new
    config into the model state, trainability as the config says. Nothing here can fail half way."""
    state = state_of(model)
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    for key, delta in attach_plan.deltas.items():
        retuned = as_retunable(delta)
        if retuned is not None:
            retuned.retune(attach_plan.config, key)
    _rewrite_base(state, attach_plan)
    state.configs[attach_plan.name] = attach_plan.config
    trains = not attach_plan.config.inference_mode
    for param in attach_plan.parameters():
        param.requires_grad_(trains)
    for param in trainable_biases(model, attach_plan.name).values():
        param.requires_grad_(param.requires_grad or trains)


def _rewrite_base(state: ModelState, attach_plan: AttachPlan) -> None:
    """Write the base tensors the folder carries (biases, embedding tables) in place. The value each held
    before the slot's first load stays recorded, so removing the adapter still restores the base."""
    records = {id(write.target) for write in state.base_writes.get(attach_plan.name, [])}
    for target, value in attach_plan.base_writes.values():
        if id(target) in records:
            with torch.no_grad():
                target.copy_(value)
        else:
            state.record_base_write(attach_plan.name, target, value)
