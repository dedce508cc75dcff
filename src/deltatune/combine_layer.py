"""One layer's combination in adapter arithmetic (``combine``): the adapters' factors there in, ``(B, A)`` out.

The three forms of peft's ``add_weighted_adapter``: "factors" (mix the A's and the B's separately),
"cat" (stack them along the rank) and "svd" (mix the dense changes, truncate by SVD).

A change that is a batch of products, one per expert (a change of a fused 3-D expert weight), is
combined as that many separate matrices (``ExpertFactors``): expert ``e`` of the result is the
combination of expert ``e`` of each adapter, with its own pruning, draws, norms and SVD, so a
fused expert stack combines exactly as the same experts would as separate layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .bases import BaseLayer
from .combine_ops import inverse_norm_weights, mix, product_norm, svd_factors


@dataclass(frozen=True)
class Arithmetic:
    """The checked settings of one call."""

    method: str
    op: str
    form: str
    density: float | None
    sign_method: str
    svd_rank: int | None
    svd_clamp: float | None
    full_matrices: bool
    driver: str | None
    generator: torch.Generator | None
    inverse_norm: bool


@dataclass(frozen=True)
class Part:
    """One adapter's change on one layer: ``ΔW = scaling * b @ a`` and its weight in the combination."""

    name: str
    weight: float
    b: Tensor
    a: Tensor
    scaling: float


@runtime_checkable
class ExpertFactors(Protocol):
    """A delta whose change is a batch of scaled low-rank products, one per expert: ``ΔW_e = s B_e A_e``.
    Its class declares this by having the method; a subclass that changes the product must not keep it."""

    def expert_factors(self) -> tuple[Tensor, Tensor, float]:
        """``(B, A, s)``: ``B`` of shape ``(experts, out, r)``, ``A`` of shape ``(experts, r, in)`` (``ΔW_e``
        in the canonical ``(out, in)`` layout), views of the live parameters, so filling them fills the delta."""
        ...


def as_expert_factors(delta: object) -> ExpertFactors | None:
    """``delta`` as an ``ExpertFactors``, or None when its class is not one."""
    return delta if isinstance(delta, ExpertFactors) else None


@dataclass(frozen=True)
class LayerParts:
    key: str
    view: BaseLayer
    parts: list[Part]
    experts: int | None = None
    """None: each part is one matrix in its method's factor layout; else the parts' ``b`` are
    ``(experts, out, r)`` and their ``a`` ``(experts, r, in)`` (``ExpertFactors``)."""

    def matrices(self) -> list[LayerParts]:
        """The layer as single matrices: itself, or one per expert."""
        if self.experts is None:
            return [self]
        return [LayerParts(self.key, self.view, [replace(p, b=p.b[e], a=p.a[e]) for p in self.parts])
                for e in range(self.experts)]


def combined(layer: LayerParts, arith: Arithmetic, rank: int) -> tuple[Tensor, Tensor]:
    """``(B, A)`` of the combination on one layer; per expert, stacked, for a batch of experts."""
    if layer.experts is not None:
        results = [combined(matrix, arith, rank) for matrix in layer.matrices()]
        return torch.stack([b for b, _ in results]), torch.stack([a for _, a in results])
    weights = [p.weight for p in layer.parts]
    if arith.inverse_norm:
        weights = inverse_norm_weights(weights, [product_norm(p.b, p.a, p.scaling) for p in layer.parts])
    if arith.form == "factors":
        return _mixed_factors(layer.parts, weights, arith)
    if arith.form == "cat":
        return _stacked(layer.parts, weights, rank)
    return _truncated(layer, weights, arith, rank)


def _mixed_factors(parts: list[Part], weights: list[float], arith: Arithmetic) -> tuple[Tensor, Tensor]:
    scaled = [w * p.scaling for w, p in zip(weights, parts)]
    # sqrt(|w s|) on both sides makes the product w s B A for one adapter; the sign goes on A only
    on_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]
    on_b = [math.sqrt(abs(x)) for x in scaled]
    args = (arith.density, arith.sign_method, arith.generator)
    a = mix(arith.op, [p.a for p in parts], on_a, *args)  # A before B: random draws in peft's order
    return mix(arith.op, [p.b for p in parts], on_b, *args), a


def _stacked(parts: list[Part], weights: list[float], rank: int) -> tuple[Tensor, Tensor]:
    """``B = [B_1 .. B_n]``, ``A = [w_1 s_1 A_1; ..]``, zero-padded to ``rank`` (a layer that only some
    adapters change has a smaller sum of ranks)."""
    a = torch.cat([p.a * w * p.scaling for w, p in zip(weights, parts)], dim=0)
    b = torch.cat([p.b for p in parts], dim=1)
    full_a, full_b = a.new_zeros(rank, *a.shape[1:]), b.new_zeros(b.shape[0], rank, *b.shape[2:])
    full_a[: a.shape[0]] = a
    full_b[:, : b.shape[1]] = b
    return full_b, full_a


def _truncated(layer: LayerParts, weights: list[float], arith: Arithmetic, rank: int) -> tuple[Tensor, Tensor]:
    """Mix the dense changes, then keep the top ``rank`` singular triplets."""
    deltas = [(p.b.flatten(1) @ p.a.flatten(1)) * p.scaling for p in layer.parts]
    # peft mixes ΔW in the layout the base stores its weight: elementwise the same, but random masks are
    # drawn in that layout, so following it keeps seeded draws equal to peft's
    flip = _stored_transposed(layer.view)
    mixed = mix(arith.op, [d.T if flip else d for d in deltas], weights, arith.density, arith.sign_method,
                arith.generator)
    return svd_factors(mixed.T if flip else mixed, rank, arith.svd_clamp, arith.full_matrices, arith.driver)


def _stored_transposed(view: BaseLayer) -> bool:
    """Whether the base stores its weight ``(in, out)`` (a transposed linear layer, an embedding table)."""
    return view.fan_in_fan_out or view.kind == "embedding"
