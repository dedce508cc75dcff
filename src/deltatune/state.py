"""What deltatune keeps on a model: its adapters' configs and which are active.

The model itself is never wrapped or re-classed; its adapted layers are replaced by
``DeltaLayer`` / ``SavedModule`` wrappers and one plain attribute, ``deltatune_state``, holds
the bookkeeping below.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .compose import Active, Composition, Parallel, Route, Sum, as_composition
from .config import DeltaConfig
from .errors import AdapterError
from .layer import STATE_ATTR, DeltaLayer, ModelDelta, SavedModule

NAME_PATTERN = re.compile(r"[^\W][\w\-]*")
"""Letters, digits, ``_`` and ``-``, not starting with ``-``: a name is also a folder name on save."""


def check_name(name: object) -> str:
    """``name`` if it can name an adapter, else an AdapterError saying why and what to use.

    A name becomes a folder under the save directory and a key of every wrapper's module dict,
    so it may not hold path separators, dots or control characters, nor shadow an attribute of
    ``nn.Module`` (``training``, ``forward``, ``to``, ...).
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' and '-' only (no dots, slashes, "
            "spaces or control characters; it becomes a folder name on save), e.g. 'default' or 'task-b'"
        )
    if hasattr(nn.ModuleDict(), name):
        raise AdapterError(
            f"adapter name {name!r} is invalid: it is an attribute of torch.nn.Module and cannot key the "
            f"adapter's modules; pick another, e.g. {name + '_adapter'!r}"
        )
    return name


@dataclass
class BaseWrite:
    """A base tensor that loading an adapter overwrote, and the value it held before."""

    target: Tensor
    before: Tensor


@dataclass
class ModelState:
    """The adapters on one model, in the order they were added."""

    configs: dict[str, DeltaConfig] = field(default_factory=dict)
    active_set: Active = field(default_factory=Active)
    """The active composition; every wrapper on the model holds this same object."""
    model_deltas: dict[str, ModelDelta] = field(default_factory=dict)
    """The model-level part of the adapters whose method has one, by adapter name."""
    base_writes: dict[str, list[BaseWrite]] = field(default_factory=dict)
    """Base tensors each adapter's load overwrote (embedding tables, biases), to undo on removal."""

    def record_base_write(self, name: str, target: Tensor, value: Tensor) -> None:
        """Write ``value`` into the base tensor ``target`` for adapter ``name``, keeping what it held."""
        with torch.no_grad():
            self.base_writes.setdefault(name, []).append(BaseWrite(target, target.detach().clone()))
            target.copy_(value)

    def undo_base_writes(self, name: str) -> None:
        """Undo what adapter ``name``'s load wrote into the base.

        Where a later adapter overwrote the same tensor, that adapter's value stays live and it
        inherits the value from before ``name``, so removing both in any order restores the base.
        """
        later = list(self.base_writes)[list(self.base_writes).index(name) + 1:] if name in self.base_writes else []
        for write in self.base_writes.pop(name, []):
            heir = next((w for n in later for w in self.base_writes[n] if w.target is write.target), None)
            if heir is not None:
                heir.before = write.before
                continue
            with torch.no_grad():
                write.target.copy_(write.before)

    @property
    def active(self) -> tuple[str, ...]:
        """The names in the active composition, in order."""
        return self.active_set.names()

    def switch_model_deltas(self, model: nn.Module, active: tuple[str, ...], final: bool = False) -> None:
        """Make the model compute with the model-level parts of ``active`` (summed) and without the
        others; each class of part decides how its active parts combine (``ModelDelta.combine``)."""
        for kind in dict.fromkeys(type(part) for part in self.model_deltas.values()):
            every = [p for p in self.model_deltas.values() if type(p) is kind]
            on = [self.model_deltas[n] for n in active if type(self.model_deltas.get(n)) is kind]
            kind.combine(model, on, every, final)
        composition = self.active_set.composition
        _repeat_inputs(model, len(composition.members) if active and isinstance(composition, Parallel) else 0)

    def require(self, name: str) -> DeltaConfig:
        if name not in self.configs:
            raise AdapterError(f"no adapter named {name!r} on this model; adapters: {list(self.configs)}")
        return self.configs[name]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (DistributedDataParallel, DataParallel), which hold it as
    ``.module``: deltatune's bookkeeping and module names belong to the model, not to the wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def state_of(model: nn.Module, create: bool = False) -> ModelState:
    """The model's adapter bookkeeping; raises if nothing was attached (unless ``create``)."""
    model = unwrap(model)
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        if not create:
            raise AdapterError("this model has no deltatune adapters; attach one with dt.attach or dt.load first")
        state = ModelState()
        model.__dict__[STATE_ATTR] = state
    return state


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop(STATE_ATTR, None)


def delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaLayer]]:
    """Every ``DeltaLayer`` in the model with its module name."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, DeltaLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """Every ``SavedModule`` in the model with its module name."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def logical_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The model's modules as the user sees them: wrappers stand for the module they wrap.

    A ``DeltaLayer`` yields its base layer under its own name (and nothing inside it), a
    ``SavedModule`` its original module, so targeting works the same before and after attach.
    """
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, DeltaLayer):
            yield path, child.base_layer
        elif isinstance(child, SavedModule):
            yield path, child.original_module
        else:
            yield path, child
            yield from logical_modules(child, f"{path}.")


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding the child at ``path``, and the child's attribute name."""
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def set_active(model: nn.Module, names: str | Sequence[str] | Composition) -> None:
    """Make ``names`` the active composition: a name, a list of names (their changes summed, in
    any order alike), or a composition such as ``dt.Stack("a", "b")`` (see ``compose``).

    Adapters merged into the weights stay merged (merged ones are active by definition, in a
    plain sum); trainability is not changed. Checked in full before anything changes.
    """
    state = state_of(model)
    composition = as_composition(names)
    active = composition.names()
    for name in active:
        state.require(name)
    if len(active) != _count_names(composition):
        raise AdapterError(f"set_active: adapter names repeat in {composition!r}; give each name once")
    for name in active if isinstance(composition, Route) else ():
        form = state.configs[name].active_form(name)
        if form != name:
            raise AdapterError(f"set_active: adapter {name!r} runs as {form!r}, a composition of other adapters; a "
                               "route gives each row one adapter. Activate it for the whole batch instead.")
    if any(_has_parallel(m) for m in composition.members if not isinstance(m, str)):
        raise AdapterError(f"set_active: {composition!r} nests dt.Parallel; Parallel repeats the whole batch, so it "
                           "can only be the outermost composition")
    layers = [layer for _, layer in delta_layers(model)]
    merged = sorted({n for layer in layers for n in layer.merged})
    stray = [n for n in merged if n not in active]
    if stray:
        raise AdapterError(
            f"set_active: adapters {stray} are merged into the weights; call dt.unmerge(model) before "
            "switching them off"
        )
    if merged and type(composition) is not Sum:
        raise AdapterError(f"set_active: adapters {merged} are merged into the weights, which holds a plain sum "
                           f"only; call dt.unmerge(model) before activating {composition!r}")
    parts = {n: state.model_deltas[n] for n in active if n in state.model_deltas}
    for kind in {type(p) for p in parts.values()}:
        kind.check_active(model, {n: p for n, p in parts.items() if type(p) is kind}, composition)
    users = tuple(n for n, c in state.configs.items() if _runs_within(c.active_form(n), composition))
    state.active_set.composition, state.active_set.users = composition, users
    state.switch_model_deltas(model, active)


_REPEATS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()
"""The input-repeating pre-hook of a model whose active set is a ``Parallel``."""


def _repeat_inputs(model: nn.Module, copies: int) -> None:
    """While a ``Parallel`` of ``copies`` members is active, the model's batch is repeated that many
    times on entry (every tensor argument whose first dimension is the batch), as AdapterHub does."""
    handle = _REPEATS.pop(model, None)
    if handle is not None:
        handle.remove()
    if copies:
        # First of all pre-hooks: hooks that read the batch (virtual tokens per row) see the repeated one.
        _REPEATS[model] = model.register_forward_pre_hook(partial(_repeated, copies), with_kwargs=True, prepend=True)


def _repeated(copies: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() > 0), None)
    if first is None:
        return args, kwargs
    rows = first.shape[0]

    def repeat(value: Any) -> Any:
        return torch.cat([value] * copies) if isinstance(value, Tensor) and value.dim() and value.shape[0] == rows else value

    return tuple(repeat(v) for v in args), {k: repeat(v) for k, v in kwargs.items()}


def _runs_within(form: str | Composition, composition: Composition) -> bool:
    return isinstance(form, Composition) and composition.contains(form)


def _has_parallel(composition: Composition) -> bool:
    return isinstance(composition, Parallel) or any(_has_parallel(m) for m in composition.members
                                                    if not isinstance(m, str))


def _count_names(composition: Composition) -> int:
    return sum(1 if isinstance(m, str) else _count_names(m) for m in composition.members)
