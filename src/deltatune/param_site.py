"""Parameter sites: adapters that change one parameter of a module rather than a layer's output.

Mixture-of-experts blocks in transformers keep their experts in fused 3-D parameters and loop
over experts in their own forward, so there is no layer whose output a change could be added to.
A ``ParameterLayer`` wraps the module that holds such a parameter and, for the call, puts
``W + Σ ΔW_i`` in the parameter's place (the module reads it as it reads its own weight); the
stored parameter is never changed outside merging. Several parameters of one module are nested
wrappers, the parameter registered first innermost, which is peft's layout: the wrapper's path
(``...experts``, ``...experts.base_layer``) is where an adapter's file keys for that parameter start.

Compositions: a plain sum (weights add), and row-wise ones (``Route``, ``BatchSplit``,
``Parallel``): each group of rows calls the module with its adapter's weight, every wrapper
nested inside reads the same group's adapters (``_PINNED``), and the rows are put back in place.
A module whose rows are tokens (an expert block sees ``(tokens, hidden)``) is what ``Route``'s
repeats are for. ``Average`` is refused: an average of the module's outputs is not the module
at an averaged weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .bases import ParameterBase
from .compose import BatchSplit, Composition, Parallel, Route, Sum
from .errors import AdapterError, TargetError
from .layer import DeltaLayer, WeightDelta
from .state import logical_modules
from .targets import matches_names, nearest_names

_PINNED: ContextVar[tuple[str, ...] | None] = ContextVar("deltatune_pinned_rows", default=None)
"""The adapters of the row group an outer wrapper is computing (None: no group; use the composition)."""


class ParameterLayer(DeltaLayer):
    """A module (or an inner ``ParameterLayer``) whose parameter ``view.name`` carries adapters' changes."""

    view: ParameterBase

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base_layer(*args, **kwargs)
        pinned = _PINNED.get()
        if pinned is not None:
            return self._call_with(pinned, args, kwargs)
        composition = self.active_set.composition
        groups = _row_groups(composition)
        if groups is None:
            return self._call_with(_summed(composition, self.view), args, kwargs)
        return self._call_by_rows(groups, args, kwargs)

    def _call_with(self, names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The wrapped call with the running changes of ``names`` substituted into the parameter."""
        deltas = [d for d in (self._running(n) for n in names) if d is not None]
        if not deltas:
            return self.base_layer(*args, **kwargs)
        with substituted(self.view.module, self.view.name, self._changed_weight(deltas)):
            return self.base_layer(*args, **kwargs)

    def _changed_weight(self, deltas: list[Any]) -> Tensor:
        """``W + ΔW`` (one change: its own ``merge``) or ``W + Σ ΔW_i``, each cast to W's dtype first."""
        weight = self.view.weight
        changes = [d for d in deltas if isinstance(d, WeightDelta)]
        if len(changes) != len(deltas):
            raise AdapterError(f"{self.view.describe()}: only weight changes can live on a parameter")
        if len(changes) == 1:
            return changes[0].merge(weight)
        total = changes[0].delta_weight(weight.float()).to(weight.dtype)
        for change in changes[1:]:
            total = total + change.delta_weight(weight.float()).to(weight.dtype)
        return weight + total

    def _call_by_rows(self, groups: _Groups, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Each group of rows called with its own adapters; the rows put back in place."""
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim()), None)
        if first is None:
            raise AdapterError(f"{self.view.describe()}: routed rows need a batched tensor input")
        size = first.shape[0]
        parts: list[Tensor] = []
        placed: list[Tensor] = []
        for names, rows in groups(size, first.device):  # the groups cover every row exactly once
            token = _PINNED.set(names)
            try:
                part = self._call_with(names, *_rows_of(args, kwargs, size, rows))
            finally:
                _PINNED.reset(token)
            if not isinstance(part, Tensor):
                raise AdapterError(f"{self.view.describe()}: the module returns {type(part).__name__}, not a tensor, "
                                   "so its rows cannot be computed per adapter")
            parts.append(part)
            placed.append(rows)
        return torch.cat(parts).index_select(0, torch.cat(placed).argsort())  # each row back in its place

    def extra_repr(self) -> str:
        return f"parameter={self.view.name!r}, {super().extra_repr()}"

    def unloaded(self, requantize: bool) -> nn.Module:
        """The active changes folded into the parameter; what this wrapper wraps takes its place."""
        super().unloaded(requantize)
        return self.base_layer


_Groups = Any  # (rows, device) -> list of (adapter names, row indices)


def _summed(composition: Composition, view: ParameterBase) -> tuple[str, ...]:
    if type(composition) is Sum and all(isinstance(m, str) for m in composition.members):
        return composition.names()
    if isinstance(composition, Route):
        return composition.names()  # a route giving every row one adapter (others are grouped by row)
    raise AdapterError(f"{composition!r} is not defined for an adapter on {view.describe()}: a parameter holds a "
                       "sum of weight changes, or one adapter per row. Use a name, a list of names, dt.Route, "
                       "dt.BatchSplit or dt.Parallel of names.")


def _row_groups(composition: Composition) -> _Groups | None:
    """For a row-wise composition, a function giving each group of rows and its adapters; else None."""
    if isinstance(composition, Route) and composition.single() is None:
        def routed(size: int, device: torch.device) -> list[tuple[tuple[str, ...], Tensor]]:
            base = (composition.slots(size, device) < 0).nonzero().flatten()
            groups = [((name,), rows) for name, rows in composition.groups(size, device) if rows.numel()]
            return groups + ([((), base)] if base.numel() else [])
        return routed
    if isinstance(composition, (BatchSplit, Parallel)):
        def split(size: int, device: torch.device) -> list[tuple[tuple[str, ...], Tensor]]:
            plan = composition.split(size) if isinstance(composition, Parallel) else composition
            total = sum(plan.sizes)
            if not total or size % total or not all(isinstance(m, str) for m in plan.members):
                raise AdapterError(f"{plan!r} on a parameter needs adapter names whose sizes add up to the batch "
                                   f"(the module sees {size} rows: batch rows, or every token of them)")
            sizes = [n * (size // total) for n in plan.sizes]  # a module that sees tokens: each row's tokens in turn
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return [((str(m),), torch.arange(s, s + n, device=device))
                    for m, s, n in zip(plan.members, starts, sizes) if n]
        return split
    return None


def _rows_of(args: tuple[Any, ...], kwargs: dict[str, Any], size: int, rows: Tensor
             ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments cut to ``rows``: every tensor whose first dimension is the batch's."""
    def cut(value: Any) -> Any:
        batched = isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size
        return value.index_select(0, rows) if batched else value
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


@contextmanager
def substituted(module: nn.Module, name: str, value: Tensor) -> Iterator[None]:
    """``module.<name>`` reads ``value`` inside the block; the Parameter (and its place in the
    module's parameter order) comes back afterwards, even on an exception."""
    params = module._parameters
    original = params[name]
    params[name] = value  # type: ignore[assignment]  # nn.Module returns the entry as it is
    try:
        yield
    finally:
        params[name] = original


@dataclass
class ParameterSite:
    """One targeted parameter: its view, the path of its wrapper (where its file keys start) and,
    for a parameter not wrapped yet, the module path where its new wrapper goes (outermost)."""

    key: str
    view: ParameterBase
    wrap_at: str | None


def parameter_sites(model: nn.Module, names: Sequence[str]) -> list[ParameterSite]:
    """The parameters ``names`` select (peft's rule: the full name equals an entry or ends with
    ``"." + entry``), new wrappers innermost first, so creating them in order nests them as peft does."""
    sites: list[ParameterSite] = []
    matched: set[str] = set()
    for path, _ in logical_modules(model):
        wrappers, module = _wrapper_chain(model.get_submodule(path))
        chosen = [n for n, _ in module.named_parameters(recurse=False) if matches_names(names, f"{path}.{n}")]
        if not chosen:
            continue
        matched.update(e for e in names for n in chosen if matches_names((e,), f"{path}.{n}"))
        views = [ParameterBase(module, n, f"{path}.{n}") for n in chosen]
        for view in views:
            _check_shape(view)
        sites.extend(_sites_of(path, views, wrappers))
    missing = [n for n in names if n not in matched]
    if missing:
        known = [f"{p}.{n}" for p, m in logical_modules(model) for n, _ in _wrapper_chain(m)[1].named_parameters(
            recurse=False)]
        raise TargetError(f"target_parameters entries {missing} match no parameter of the model. Closest parameter "
                          f"names: {nearest_names(missing, known)}. An entry must equal a parameter's full name or "
                          "its last dotted parts (e.g. 'mlp.experts.gate_up_proj' or 'gate_up_proj').")
    return sites


def _wrapper_chain(module: nn.Module) -> tuple[list[DeltaLayer], nn.Module]:
    """The wrappers around a module, outermost first, and the module itself."""
    chain = []
    while isinstance(module, DeltaLayer):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _check_shape(view: ParameterBase) -> None:
    weight = view.weight
    if weight.dim() not in (2, 3) or not weight.is_floating_point():
        raise TargetError(f"target_parameters selects {view.describe()}, a {weight.dim()}-D {weight.dtype} tensor; "
                          "only 2-D weights (out, in) and 3-D expert stacks (experts, out, in) of floating point "
                          "can be adapted. Fix: name the experts' weights, not biases or other tensors.")


def _sites_of(path: str, views: list[ParameterBase], wrappers: list[DeltaLayer]) -> list[ParameterSite]:
    """Where each parameter's wrapper is or will be: the last registered outermost at ``path``."""
    if not wrappers:
        depth = len(views)
        return [ParameterSite(path + ".base_layer" * (depth - 1 - i), v, path) for i, v in enumerate(views)]
    existing = [w.view.name if isinstance(w, ParameterLayer) else None for w in wrappers]
    if set(existing) != {v.name for v in views} or len(existing) != len(views):
        raise TargetError(
            f"{path} is already adapted on {existing} (None: as a layer, through target_modules); an adapter on its "
            f"parameters must target the same ones, {[v.name for v in views]} given, because the wrappers' nesting "
            "is where each parameter's tensors are saved (peft requires the same). Fix: target the same parameters.")
    levels = {name: i for i, name in enumerate(existing)}
    return [ParameterSite(path + ".base_layer" * levels[v.name], v, None) for v in views]


def is_parameter_layer(model: nn.Module, key: str) -> bool:
    """Whether the module at ``key`` is wrapped for a parameter (no layer change may join it)."""
    return isinstance(model.get_submodule(key), ParameterLayer)
