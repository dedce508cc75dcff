"""LoRA adapters of a mixed batch in one batched product (the Punica / S-LoRA idea).

When the rows of a batch are routed among several LoRA adapters on a linear layer, their factors
are stacked (ranks padded with zeros to the largest, each B scaled by its adapter's ``alpha / r``),
every routed row gathers its own pair, and two batched products give every row its change:
``h = x_i A_{a(i)}ᵀ``, ``Δy_i = h B_{a(i)}ᵀ``. Zero padding adds exact zeros, so a row's change is
its adapter's alone; gradients reach each adapter through its rows only. Registered in
``layer.ROUTED_CHANGE``; with active dropout (a different rate per adapter) or adapters of
different dtypes the layer runs each adapter on its own rows instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import register_routed
from .lora import LoraDelta


def stacked_factors(deltas: Sequence[LoraDelta | None]) -> tuple[Tensor, Tensor] | None:
    """``(A, s B)`` of every slot stacked, ``(n, r, in)`` and ``(n, out, r)`` with r the largest rank
    (an adapter absent from this layer: zeros); None when the adapters' dtypes differ."""
    live = [d for d in deltas if d is not None]
    if len({d.A.dtype for d in live}) != 1:
        return None
    rank = max(d.A.shape[0] for d in live)
    template = live[0]
    a_rows, b_rows = [], []
    for delta in deltas:
        if delta is None:
            a_rows.append(template.A.new_zeros(rank, template.A.shape[1]))
            b_rows.append(template.B.new_zeros(template.B.shape[0], rank))
            continue
        pad = rank - delta.A.shape[0]
        a_rows.append(F.pad(delta.A, (0, 0, 0, pad)))
        b_rows.append(F.pad(delta.B * delta.scaling, (0, pad)))
    return torch.stack(a_rows), torch.stack(b_rows)


@dataclass
class _Stacked:
    """Stacked factors kept between calls that need no gradient (a served route keeps its adapters
    for many decoding steps), with what they were built from: the deltas themselves (weakly, so a
    deleted adapter never matches a new one) and their tensors' versions (an in-place change such as
    a hot-swap makes a new stack)."""

    deltas: list[weakref.ref[LoraDelta] | None]
    versions: list[tuple[int, ...]]
    factors: tuple[Tensor, Tensor]

    def serves(self, deltas: Sequence[LoraDelta | None]) -> bool:
        return len(deltas) == len(self.deltas) and all(
            (d is None and r is None) or (d is not None and r is not None and r() is d)
            for d, r in zip(deltas, self.deltas)) and self.versions == _versions(deltas)


_STACKS: weakref.WeakKeyDictionary[LoraDelta, _Stacked] = weakref.WeakKeyDictionary()
"""The last stack built without gradients, by the first routed delta of a layer."""


def _versions(deltas: Sequence[LoraDelta | None]) -> list[tuple[int, ...]]:
    return [() if d is None else (d.A._version, d.B._version, d.A.data_ptr(), d.B.data_ptr(), *_scaling_key(d))
            for d in deltas]


def _scaling_key(delta: LoraDelta) -> tuple[int, ...]:
    scaling = delta.scaling
    return (scaling._version, scaling.data_ptr()) if isinstance(scaling, Tensor) else (hash(scaling),)


def factors_for(deltas: Sequence[LoraDelta | None]) -> tuple[Tensor, Tensor] | None:
    """``stacked_factors``, kept for the next call when gradients are off (``no_grad``, inference mode)."""
    live = [d for d in deltas if d is not None]
    if torch.is_grad_enabled():  # a stack in the autograd graph (or one from inference mode) cannot be kept
        return stacked_factors(deltas)
    kept = _STACKS.get(live[0])
    if kept is not None and kept.serves(deltas):
        return kept.factors
    factors = stacked_factors(deltas)
    if factors is not None:
        _STACKS[live[0]] = _Stacked([None if d is None else weakref.ref(d) for d in deltas], _versions(deltas), factors)
    return factors


def routed_lora(deltas: Sequence[LoraDelta | None], slots: Tensor, x: Tensor, y: Tensor) -> Tensor | None:
    """What the routed adapters add to ``y`` (see the module docstring), or None where it does not apply."""
    live = [d for d in deltas if d is not None]
    if any(d.training and isinstance(d.dropout, nn.Dropout) for d in live) or not x.is_floating_point():
        return None
    factors = factors_for(deltas)
    if factors is None:
        return None
    a, b = factors
    if bool((slots >= 0).all()):  # every row routed: no gather of the input, no scatter of the change
        return _batched(x, a, b, slots).to(y.dtype)
    routed = (slots >= 0).nonzero().flatten()
    change = _batched(x.index_select(0, routed), a, b, slots.index_select(0, routed))
    return torch.zeros_like(y).index_copy(0, routed, change.to(y.dtype))


def _batched(x: Tensor, a: Tensor, b: Tensor, owners: Tensor) -> Tensor:
    """Row i's change ``(x_i A_{o(i)}ᵀ) B_{o(i)}ᵀ`` for every row, in two batched products."""
    flat = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
    hidden = torch.bmm(flat, a.index_select(0, owners).transpose(1, 2))
    change = torch.bmm(hidden, b.index_select(0, owners).transpose(1, 2))
    return change.reshape(*x.shape[:-1], -1)

register_routed(LoraDelta, "linear", routed_lora)
