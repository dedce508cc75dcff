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

from collections.abc import Sequence

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


def routed_lora(deltas: Sequence[LoraDelta | None], slots: Tensor, x: Tensor, y: Tensor) -> Tensor | None:
    """What the routed adapters add to ``y`` (see the module docstring), or None where it does not apply."""
    live = [d for d in deltas if d is not None]
    if any(d.training and isinstance(d.dropout, nn.Dropout) for d in live) or not x.is_floating_point():
        return None
    factors = stacked_factors(deltas)
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
