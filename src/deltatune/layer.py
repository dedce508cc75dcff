"""The wrappers that hold a base layer together with its named per-adapter changes.

``Delta`` is the one interface every weight-space method implements, for one (layer, adapter)
pair: ``forward(x, y)`` turns the base output ``y`` into the adapted output, ``merge`` and
``unmerge`` fold the change into a dense weight and back, ``tensors`` names the parameters as
peft's files do. ``DeltaLayer`` wraps a base layer and applies its active deltas in order;
``SavedModule`` keeps a trainable full copy of a module per adapter (``modules_to_save``).

Both wrappers keep their base under peft's child names (``base_layer``, ``original_module``), so
base parameter names in ``state_dict()`` match a peft model's, and forward unknown attributes to
the wrapped module so code that reads ``layer.in_features`` or ``layer.weight`` keeps working.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .bases import BaseLayer


class Delta(nn.Module, ABC):
    """One method's change to one base layer for one adapter."""

    changes_input: ClassVar[bool] = False
    """Whether ``before`` changes the base layer's input (e.g. a method that scales the input of feed-forward layers)."""

    @abstractmethod
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The adapted output, given the layer input ``x`` and the base output so far ``y``."""

    @abstractmethod
    def merge(self, weight: Tensor) -> Tensor:
        """The dense canonical weight with this change folded in (``W -> W'``)."""

    @abstractmethod
    def unmerge(self, weight: Tensor) -> Tensor:
        """The inverse of ``merge`` (``W' -> W``), exact up to floating-point rounding."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """This delta's saved tensors, keyed by peft's names relative to the layer."""

    def forward_with_base(self, x: Tensor) -> Tensor | None:
        """The whole layer's output (base and this change) in one fused computation, or None when
        the method has none for this input; only asked when this is the layer's one running delta."""
        return None

    def before(self, x: Tensor) -> Tensor:
        """The input the base layer should see; only called when ``changes_input``."""
        return x

    def merge_bias(self, bias: Tensor) -> Tensor:
        """The base bias with this change folded in (most methods leave it alone)."""
        return bias

    def unmerge_bias(self, bias: Tensor) -> Tensor:
        """The inverse of ``merge_bias``."""
        return bias

    def adjust_base(self, weight: Tensor) -> Tensor | None:
        """For inits that move part of W into the delta: the residual base weight, else None."""
        return None

    def tensors_to_save(self) -> dict[str, Tensor]:
        """What a save writes: ``tensors()``, unless the method saves a pruned form of them (a
        rank cut during training is dropped from the file while the live tensors keep their size)."""
        return self.tensors()


class ModelDelta(nn.Module):
    """One adapter's part that belongs to the model as a whole rather than to one layer.

    Two uses: tensors kept once and shared by every layer delta of the adapter, and changes that
    have no layer of their own (e.g. a selection of existing parameters that the adapter trains).
    The model state keeps it by adapter name; save and load use ``tensors()`` with full file keys.
    """

    def tensors(self) -> dict[str, Tensor]:
        """Saved tensors by full file key (e.g. ``base_model.<name>``); live, so a load fills them."""
        return {}

    def switch(self, model: nn.Module, on: bool) -> None:
        """Make ``model`` compute with (``on``) or without this change. Shared tensors act only
        through the layer deltas, so by default there is nothing to do."""


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


class DeltaLayer(_Forwarding):
    """A base layer plus named deltas; the active ones that are not merged run in forward."""

    _wrapped_name = "base_layer"

    def __init__(self, base_layer: nn.Module, view: BaseLayer) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.view = view
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.enabled = True

    def delta(self, name: str) -> Delta:
        """The delta of adapter ``name`` on this layer."""
        return self.deltas[name]  # type: ignore[return-value]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.enabled:
            return self.base_layer(x, *args, **kwargs)
        running = [self.delta(n) for n in self.active if n in self.deltas and n not in self.merged]
        if len(running) == 1 and not args and not kwargs:
            fused = running[0].forward_with_base(x)
            if fused is not None:
                return fused
        base_input = x
        for delta in running:
            if delta.changes_input:
                base_input = delta.before(base_input)
        y = self.base_layer(base_input, *args, **kwargs)
        for delta in running:
            y = delta(x, y)
        return y

    def merge(self, names: tuple[str, ...]) -> None:
        """Fold the named deltas into the base weight (computed in fp32, stored in its dtype)."""
        todo = [n for n in names if n in self.deltas and n not in self.merged]
        if not todo:
            return
        self.view.check_writable()
        weight, bias = self._folded(todo)
        self.view.write_weight(weight)
        if bias is not None:
            self.view.write_bias(bias)
        self.merged.extend(todo)

    def _folded(self, names: list[str]) -> tuple[Tensor, Tensor | None]:
        """The base weight (fp32) and bias with the named deltas folded in, in order; nothing is written."""
        weight, bias = self.view.read_weight().float(), self.view.bias
        for name in names:
            weight = self.delta(name).merge(weight)
            bias = None if bias is None else self.delta(name).merge_bias(bias.float())
        return weight, bias

    def unloaded(self, requantize: bool) -> nn.Module:
        """The plain module computing what this layer computes, active deltas folded in (see ``merged_module``).

        The wrapper is spent afterwards: a dense base has been changed in place.
        """
        todo = [n for n in self.active if n in self.deltas and n not in self.merged]
        if not todo:
            return self.view.merged_module(None, None, requantize)
        weight, bias = self._folded(todo)
        return self.view.merged_module(weight, bias, requantize)

    def unmerge(self) -> None:
        """Take every merged delta back out of the base weight, last merged first."""
        if not self.merged:
            return
        weight, bias = self.view.read_weight().float(), self.view.bias
        for name in reversed(self.merged):
            weight = self.delta(name).unmerge(weight)
            bias = None if bias is None else self.delta(name).unmerge_bias(bias.float())
        self.merged.clear()
        self.view.write_weight(weight)
        if bias is not None:
            self.view.write_bias(bias)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}, enabled={self.enabled}"


class SavedModule(_Forwarding):
    """A module trained in full for some adapters: one copy per adapter, original kept frozen."""

    _wrapped_name = "original_module"

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.enabled = True

    def current(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        if self.enabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters on a half-precision base are kept in fp32 (peft's autocast_adapter_dtype)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
