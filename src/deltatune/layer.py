"""The wrappers that hold a base layer together with its named per-adapter changes.

Capabilities, each a small interface (no flags on one big class):

- ``Delta``: one method's change to one base layer for one adapter. ``forward(x, y)`` turns the
  base output ``y`` into the adapted output; ``contribution(x, y)`` is what the change adds to
  ``y`` (used when several adapters are summed); ``tensors`` names the parameters as peft's
  files do.
- ``WeightDelta``: a change that is a change of the layer's weight (and maybe bias):
  ``delta_weight(W)`` is the dense ``ΔW`` in fp32. Merging and unmerging are derived from it once,
  here, for every method; a method whose ``ΔW`` depends on ``W`` says so and, where it can, gives
  an exact ``inverse``.
- ``InputTransform``: a change of what the base layer reads (a scaling of its input).
- Fused kernels: a table keyed by (delta class, base kind), so the generic layer never asks a
  delta whether it has one.

``DeltaLayer`` wraps a base layer and computes the model's active composition (``compose``) for
the deltas it holds; ``SavedModule`` keeps a trainable full copy of a module per adapter
(``modules_to_save``). Both keep their base under peft's child names (``base_layer``,
``original_module``), so base parameter names in ``state_dict()`` match a peft model's, and
forward unknown attributes to the wrapped module so code that reads ``layer.in_features`` or
``layer.weight`` keeps working.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .bases import BaseLayer
from .compose import Active, Average, BatchSplit, Composition, Parallel, Route, Sum
from .errors import AdapterError


class Delta(nn.Module, ABC):
    """One method's change to one base layer for one adapter."""

    @abstractmethod
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The adapted output, given the layer input ``x`` and the base output ``y``."""

    def contribution(self, x: Tensor, y: Tensor) -> Tensor:
        """What this change adds to the base output ``y`` (so a sum of adapters is order-free)."""
        return self(x, y) - y

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """This delta's saved tensors, keyed by peft's names relative to the layer."""

    def tensors_to_save(self) -> dict[str, Tensor]:
        """What a save writes: ``tensors()``, unless the method saves a pruned form of them (a
        rank cut during training is dropped from the file while the live tensors keep their size)."""
        return self.tensors()


class WeightDelta(Delta):
    """A change of the layer's weight: ``W' = W + ΔW(W)`` (and ``b' = b + Δb(b)``)."""

    depends_on_weight: ClassVar[bool] = False
    """Whether ``ΔW`` depends on ``W`` (a scaling of W, a normalisation), not only on the adapter."""

    @abstractmethod
    def delta_weight(self, weight: Tensor) -> Tensor:
        """``ΔW`` in fp32, in the canonical ``(out, in, *kernel)`` layout, for the fp32 base weight
        ``weight`` (methods whose change does not depend on it ignore it)."""

    def delta_bias(self, bias: Tensor) -> Tensor | None:
        """``Δb`` in fp32 for the fp32 base bias, or None when the bias does not change."""
        return None

    def merge_state(self, weight: Tensor) -> Tensor | None:
        """What ``inverse`` will need, taken from the base weight at merge time (kept by the layer)."""
        return None

    def inverse(self, merged: Tensor, state: Tensor | None) -> Tensor | None:
        """The fp32 base weight given ``merge(W)`` with only this change merged and ``merge_state(W)``,
        or None when the method has no exact inverse (the layer then keeps ``ΔW`` itself)."""
        return None if self.depends_on_weight else merged - self.delta_weight(merged)

    def merge(self, weight: Tensor) -> Tensor:
        """``W + ΔW(W)``."""
        return weight + self.delta_weight(weight).to(weight)


ADAPTER_PARTS = ("deltas", "copies", "site_adapters")
"""Child names under which adapters keep their modules in a model; everything else is the base."""


@runtime_checkable
class InputTransform(Protocol):
    """A change of what the base layer reads: the layer computes ``base(transform_input(x))``."""

    def transform_input(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class MovesBase(Protocol):
    """A delta whose init takes part of the base weight into itself (e.g. from its singular vectors)."""

    def take_residual(self) -> Tensor | None:
        """The base weight that remains (fp32), handed over once; None when the init took nothing."""


FusedForward = Callable[[Any, Tensor], "Tensor | None"]
FUSED_FORWARD: dict[tuple[type[Delta], str], FusedForward] = {}
"""(delta class, base kind) -> a function computing base and change in one go, or None when it
does not apply to this input; used when one delta runs alone on a layer."""


def register_fused(delta_class: type[Delta], kind: str, forward: FusedForward) -> None:
    """Declare a fused whole-layer forward for ``delta_class`` on base layers of ``kind``."""
    FUSED_FORWARD[(delta_class, kind)] = forward


RoutedChange = Callable[[Sequence[Any], Tensor, Tensor, Tensor], "Tensor | None"]
ROUTED_CHANGE: dict[tuple[type[Delta], str], RoutedChange] = {}
"""(delta class, base kind) -> a function computing, in one batched product, what several deltas of
that class add to a batch whose rows are routed among them: ``f(deltas, slots, x, y)`` with
``slots[i]`` the index in ``deltas`` of row ``i``'s delta (-1: none), or None when it does not apply
(the layer then runs each delta on its own rows)."""


def register_routed(delta_class: type[Delta], kind: str, change: RoutedChange) -> None:
    """Declare a batched routed change for deltas of ``delta_class`` on base layers of ``kind``."""
    ROUTED_CHANGE[(delta_class, kind)] = change


class ModelDelta(nn.Module):
    """One adapter's part that belongs to the model as a whole rather than to one layer.

    Two uses: tensors kept once and shared by every layer delta of the adapter, and changes that
    have no layer of their own (e.g. a selection of existing parameters that the adapter trains).
    The model state keeps it by adapter name; save and load use ``tensors()`` with full file keys.
    """

    mergeable: ClassVar[bool] = True
    """Whether merging and ``unload(merge=True)`` can keep this change without deltatune (an
    activation adapter cannot: there is no weight to fold it into)."""

    def modules_changed(self) -> int:
        """How many modules of the model this part changes by itself (not through layer deltas)."""
        return 0

    def place(self, model: nn.Module, name: str) -> None:
        """Register this part's modules in the model's module tree (under an ``ADAPTER_PARTS``
        name), so that ``model.parameters()``, ``model.to()`` and optimizers see them. Cannot fail:
        whatever could go wrong is checked when the part is built. By default nothing to do."""

    def unplace(self, model: nn.Module, name: str) -> None:
        """Take out what ``place`` put in."""

    def tensors(self) -> dict[str, Tensor]:
        """Saved tensors by full file key (e.g. ``base_model.<name>``); live, so a load fills them."""
        return {}

    def tensors_to_save(self) -> dict[str, Tensor]:
        """What a file holds, when that is not the live tensors (a prompt encoder saves its output)."""
        return self.tensors()

    def switch(self, model: nn.Module, on: bool) -> None:
        """Make ``model`` compute with (``on``) or without this change. Shared tensors act only
        through the layer deltas, so by default there is nothing to do."""

    @classmethod
    def check_active(cls, model: nn.Module, active: Mapping[str, ModelDelta], composition: Composition) -> None:
        """Refuse, before anything changes, a composition that the ``active`` parts of this class (by
        adapter name) cannot compute; ``combine`` then cannot fail. By default every one can."""

    @classmethod
    def combine(cls, model: nn.Module, active: Sequence[ModelDelta], every: Sequence[ModelDelta],
                final: bool = False) -> None:
        """Make ``model`` compute with the sum of the ``active`` parts of this class and without the
        rest of ``every``. By default each part switches on its own; a class whose parts change the
        same tensor combines them here. ``final``: the result must stand without deltatune (an
        unload that merges), so nothing may stay hooked in."""
        for part in every:
            if part not in active:
                part.switch(model, False)
        for part in active:
            part.switch(model, True)


class Removable(Protocol):
    """Something a hooked part installed and can take off again (a hook handle, a set of site hooks)."""

    def remove(self) -> None: ...


STATE_ATTR = "deltatune_state"
"""The plain attribute of a model that holds its adapters' bookkeeping (``state.ModelState``)."""
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, dict[type, list[Removable]]] = weakref.WeakKeyDictionary()
"""What each class of hooked part has installed on each model."""


class HookedDelta(ModelDelta):
    """A model-level part that acts through hooks it installs for the active parts of its class;
    ``combine`` takes the class's old hooks off and asks ``install`` for the new ones."""

    def switch(self, model: nn.Module, on: bool) -> None:
        type(self).combine(model, [self] if on else [], [self])

    @classmethod
    def combine(cls, model: nn.Module, active: Sequence[ModelDelta], every: Sequence[ModelDelta],
                final: bool = False) -> None:
        for hooks in _INSTALLED.setdefault(model, {}).pop(cls, []):
            hooks.remove()
        state = model.__dict__.get(STATE_ATTR)
        if not active or state is None:
            return
        names = {id(part): name for name, part in state.model_deltas.items()}
        _INSTALLED[model][cls] = cls.install(model, {names[id(part)]: part for part in active}, final)

    @classmethod
    def install(cls, model: nn.Module, active: dict[str, ModelDelta], final: bool) -> list[Removable]:
        """Hook the ``active`` parts (by adapter name) into the model; with ``final``, make their change
        permanent instead (an unload that merges) and install nothing."""
        raise AdapterError(f"{cls.__name__} does not say how it hooks into a model")


class _Forwarding(nn.Module):
    """A wrapper that reads attributes it lacks from its wrapped module."""

    _wrapped_name = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._wrapped_name:
                raise
            return getattr(super().__getattr__(self._wrapped_name), name)


@dataclass
class MergeRecord:
    """What ``DeltaLayer.merge`` folded into the base, so that ``unmerge`` can take it out again."""

    names: list[str]
    weight_change: Tensor | None
    """The exact ``ΔW`` added, kept only when it cannot be recomputed from the merged weight."""
    bias_change: Tensor | None
    inverse_state: Tensor | None = None
    """With one delta merged: what its ``inverse`` needs (``WeightDelta.merge_state``)."""


class DeltaLayer(_Forwarding):
    """A base layer plus named deltas; computes the model's active composition for them."""

    _wrapped_name = "base_layer"

    def __init__(self, base_layer: nn.Module, view: BaseLayer, active: Active) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.view = view
        self.active_set = active  # the model's one holder, shared with every wrapper
        self.record: MergeRecord | None = None
        self.enabled = True

    @property
    def active(self) -> tuple[str, ...]:
        """The active adapter names (of the whole model)."""
        return self.active_set.names()

    @property
    def merged(self) -> list[str]:
        """The adapters folded into the base weight, in merge order."""
        return list(self.record.names) if self.record is not None else []

    def delta(self, name: str) -> Delta:
        """The delta of adapter ``name`` on this layer."""
        return self.deltas[name]  # type: ignore[return-value]

    def _running(self, name: str) -> Delta | None:
        return self.delta(name) if name in self.deltas and name not in self.merged else None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.enabled:
            return self.base_layer(x, *args, **kwargs)
        composition = self.active_set.composition
        alone = self._alone(composition)
        if alone is not None and not args and not kwargs:
            if isinstance(composition, Route):
                composition.repeats(x.shape[0])  # a batch that does not fit the route is refused
            return self._forward_alone(alone, x)
        y = self.base_layer(x, *args, **kwargs)
        change = self._change(composition, x, y)
        return y if change is None else (y + change).to(y.dtype)

    def _alone(self, composition: Composition) -> Delta | None:
        """The one delta that runs here, when the composition is a plain sum with one running member
        (or a route giving every row the same adapter)."""
        if isinstance(composition, Route):
            single = composition.single()
            return None if single is None else self._running(single)
        if type(composition) is not Sum:
            return None
        running = [d for d in (self._running(n) for n in composition.names()) if d is not None]
        return running[0] if len(running) == 1 and all(isinstance(m, str) for m in composition.members) else None

    def _forward_alone(self, delta: Delta, x: Tensor) -> Tensor:
        fused = FUSED_FORWARD.get((type(delta), self.view.kind))
        out = fused(delta, x) if fused is not None else None
        if out is not None:
            return out
        base_input = delta.transform_input(x) if isinstance(delta, InputTransform) else x
        return delta(x, self.base_layer(base_input))

    def _change(self, composition: Composition | str, x: Tensor, y: Tensor) -> Tensor | None:
        """What ``composition`` adds to the base output ``y`` here (None: nothing runs here)."""
        if isinstance(composition, str):
            delta = self._running(composition)
            return None if delta is None else delta.contribution(x, y)
        if type(composition) is Sum:
            return _total(self._change(m, x, y) for m in composition.members)
        if isinstance(composition, Average):  # Σ w_i (y + Δ_i) - y
            parts = [self._change(m, x, y) for m in composition.members]
            scaled = [None if p is None else p * w for p, w in zip(parts, composition.weights)]
            rest = (sum(composition.weights) - 1.0) * y
            total = _total(scaled)
            return rest if total is None else rest + total
        if isinstance(composition, BatchSplit):
            return self._split_change(composition, x, y)
        if isinstance(composition, Parallel):
            return self._split_change(composition.split(x.shape[0]), x, y)
        if isinstance(composition, Route):
            return self._routed_change(composition, x, y)
        if not any(name in self.deltas for name in composition.names()):
            return None
        raise AdapterError(
            f"{composition!r} is not defined for weight-space adapters on {self.view.describe()}: "
            f"{type(composition).__name__} combines activation adapters (bottleneck adapters). Use dt.Sum, "
            "dt.Average, dt.BatchSplit, dt.Parallel or dt.Route for these adapters."
        )

    def _split_change(self, split: BatchSplit, x: Tensor, y: Tensor) -> Tensor | None:
        if sum(split.sizes) != x.shape[0]:
            raise AdapterError(
                f"{split!r}: the sizes add up to {sum(split.sizes)} rows but the batch has {x.shape[0]}; "
                "give one row count per member that together cover the batch"
            )
        parts, start, found = [], 0, False
        for member, size in zip(split.members, split.sizes):
            rows = slice(start, start + size)
            part = self._change(member, x[rows], y[rows])
            found = found or part is not None
            parts.append(torch.zeros_like(y[rows]) if part is None else part.to(y.dtype))
            start += size
        return torch.cat(parts) if found else None

    def _routed_change(self, route: Route, x: Tensor, y: Tensor) -> Tensor | None:
        """Each routed adapter's change on its own rows: one batched product over all of them where
        their class has one (``ROUTED_CHANGE``), else one gather and one change per adapter."""
        deltas = [self._running(n) for n in route.names()]  # in the order of the route's groups and slots
        groups = [(d, rows) for d, (_, rows) in zip(deltas, route.groups(x.shape[0], x.device))
                  if d is not None and rows.numel()]
        if not groups:
            return None
        kinds = {type(d) for d, _ in groups}
        batched = ROUTED_CHANGE.get((kinds.pop(), self.view.kind)) if len(kinds) == 1 and len(groups) > 1 else None
        if batched is not None:
            change = batched(deltas, route.slots(x.shape[0], x.device), x, y)
            if change is not None:
                return change
        out = torch.zeros_like(y)
        for delta, rows in groups:
            part = delta.contribution(x.index_select(0, rows), y.index_select(0, rows))
            out = out.index_copy(0, rows, part.to(y.dtype))
        return out

    def merge(self, names: Sequence[str]) -> None:
        """Fold the named deltas (with those already merged) into the base weight: ``W + Σ ΔW_i(W)``,
        every ``ΔW_i`` from the same base ``W``, computed in fp32 and stored in the weight's dtype."""
        todo = [n for n in names if n in self.deltas and n not in self.merged]
        if not todo:
            return
        self.view.check_writable()
        everything = self.merged + todo
        self.unmerge()  # every ΔW_i is computed from the base weight, not from a merged one
        weight, bias = self.view.read_weight().float(), self.view.bias
        bias = None if bias is None else bias.float().clone()
        deltas = [self._weight_delta(n) for n in everything]
        merged = _merged_weight(deltas, weight)
        weight_change = merged - weight  # kept below only where no inverse recomputes it
        bias_change = None if bias is None else _total(d.delta_bias(bias) for d in deltas)
        alone = len(deltas) == 1 and _self_inverting(deltas[0])
        keep = any(d.depends_on_weight for d in deltas) and not alone
        state = deltas[0].merge_state(weight) if alone else None
        # everything is computed before the first write: ``weight`` may be a view of the stored weight
        self.record = MergeRecord(everything, weight_change if keep else None, bias_change, state)
        self.view.write_weight(merged)
        if bias is not None and bias_change is not None:
            self.view.write_bias(bias + bias_change)

    def _weight_delta(self, name: str) -> WeightDelta:
        delta = self.delta(name)
        if not isinstance(delta, WeightDelta):
            raise AdapterError(f"adapter {name!r} on {self.view.describe()} is not a weight change "
                               f"({type(delta).__name__}); it cannot be merged into the weight")
        return delta

    def _folded(self) -> tuple[Tensor | None, Tensor | None]:
        """The base weight (fp32) and bias with every active delta folded in; nothing is written."""
        names = [n for n in self.active_set.names() if n in self.deltas]
        if not names:
            return None, None
        weight = self._base_weight()
        deltas = [self._weight_delta(n) for n in names]
        folded = _merged_weight(deltas, weight)
        bias = self._base_bias()
        change = None if bias is None else _total(d.delta_bias(bias) for d in deltas)
        return folded, (None if change is None or bias is None else bias + change)

    def unloaded(self, requantize: bool) -> nn.Module:
        """The plain module computing what this layer computes, active deltas folded in (see ``merged_module``).

        The wrapper is spent afterwards: a dense base has been changed in place.
        """
        weight, bias = self._folded()
        return self.view.merged_module(weight, bias, requantize)

    def _base_weight(self) -> Tensor:
        """The fp32 base weight without any merged change, computed without writing."""
        merged = self.view.read_weight().float()
        record = self.record
        if record is None:
            return merged
        if record.weight_change is not None:
            return merged - record.weight_change.to(merged)
        deltas = [self._weight_delta(n) for n in record.names]
        if len(deltas) == 1:
            base = deltas[0].inverse(merged, record.inverse_state)
            assert base is not None  # a record keeps the change whenever the inverse is unknown
            return base
        return merged - _total_tensor([d.delta_weight(merged) for d in deltas])

    def _base_bias(self) -> Tensor | None:
        bias = self.view.bias
        if bias is None:
            return None
        change = self.record.bias_change if self.record is not None else None
        return bias.float() if change is None else bias.float() - change

    def unmerge(self) -> None:
        """Take every merged delta back out of the base weight."""
        if self.record is None:
            return
        weight, bias = self._base_weight(), self._base_bias()
        self.record = None
        self.view.write_weight(weight)
        if bias is not None:
            self.view.write_bias(bias)

    def extra_repr(self) -> str:
        return f"active={self.active_set.composition!r}, merged={self.merged}, enabled={self.enabled}"


def _total(parts: Any) -> Tensor | None:
    """The sum of the tensors in ``parts`` that are not None (None when all are)."""
    total: Tensor | None = None
    for part in parts:
        if part is not None:
            total = part if total is None else total + part
    return total


def _merged_weight(deltas: list[WeightDelta], weight: Tensor) -> Tensor:
    """``W + Σ ΔW_i(W)``; one delta alone uses its own ``merge`` (exact in its own form)."""
    if len(deltas) == 1:
        return deltas[0].merge(weight)
    return weight + _total_tensor([d.delta_weight(weight) for d in deltas])


def _total_tensor(parts: list[Tensor]) -> Tensor:
    total = _total(parts)
    assert total is not None
    return total


def _self_inverting(delta: WeightDelta) -> bool:
    return not delta.depends_on_weight or type(delta).inverse is not WeightDelta.inverse


class SavedModule(_Forwarding):
    """A module trained in full for some adapters: one copy per adapter, original kept frozen."""

    _wrapped_name = "original_module"

    def __init__(self, original_module: nn.Module, active: Active) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_set = active
        self.enabled = True

    def current(self) -> nn.Module:
        """The copy of the first adapter in use that has one (``Active.owners``), else the original."""
        if self.enabled:
            for name in self.active_set.owners():
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = self.active_set.composition
        if self.enabled and isinstance(route, Route) and any(n in self.copies for n in route.names()):
            return self._routed(route, args, kwargs)
        return self.current()(*args, **kwargs)

    def _routed(self, route: Route, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Each adapter's copy on its own rows, the original on the others (per-adapter task heads)."""
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim()), None)
        if first is None:
            raise AdapterError(f"{type(self.original_module).__name__}: routed rows need a batched tensor input")
        size = first.shape[0]

        def rows_of(value: Any, rows: Tensor) -> Any:
            return value.index_select(0, rows) if isinstance(value, Tensor) and value.dim() and value.shape[0] == size \
                else value

        slots = route.slots(size, first.device)
        groups = [(self.copies[n] if n in self.copies else self.original_module, rows)
                  for n, rows in route.groups(size, first.device) if rows.numel()]
        base_rows = (slots < 0).nonzero().flatten()
        if base_rows.numel():
            groups.append((self.original_module, base_rows))
        out: Tensor | None = None
        for module, rows in groups:
            part = module(*(rows_of(a, rows) for a in args), **{k: rows_of(v, rows) for k, v in kwargs.items()})
            if not isinstance(part, Tensor):
                raise AdapterError(f"{type(self.original_module).__name__} returns {type(part).__name__}, not a tensor: "
                                   "its per-adapter copies cannot be routed by row")
            out = part.new_zeros(size, *part.shape[1:]) if out is None else out
            out = out.index_copy(0, rows, part)
        assert out is not None
        return out


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters on a half-precision base are kept in fp32 (peft's autocast_adapter_dtype)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
