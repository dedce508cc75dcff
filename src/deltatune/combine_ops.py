"""The tensor operations of adapter arithmetic: task arithmetic, TIES, DARE, magnitude pruning, SVD.

Each ``mix`` takes one tensor per adapter (all of one shape, for one layer) and their weights and
returns one tensor. The definitions are those of peft's ``merge_utils`` (TIES: Yadav et al. 2023,
"TIES-Merging"; DARE: Yu et al. 2024, "Language Models are Super Mario"), computed in the same
order, so that results agree with peft's to rounding and random draws can be aligned with its.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Op:
    """One way of mixing tensors: how each is sparsified first, and whether signs are elected."""

    prune: str | None
    """None (keep all), "magnitude" (keep the largest entries) or "random" (DARE: keep at random, rescaled)."""
    elect_sign: bool
    """TIES: per entry, keep only the adapters agreeing with the majority sign, and average them."""


OPS: dict[str, Op] = {
    "linear": Op(None, False),
    "ties": Op("magnitude", True),
    "dare_linear": Op("random", False),
    "dare_ties": Op("random", True),
    "magnitude_prune": Op("magnitude", False),
}
SIGN_METHODS = ("total", "frequency")


def keep_largest(tensor: Tensor, density: float) -> Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top.indices] = 1
    return tensor * mask.reshape(tensor.shape)


def keep_random(tensor: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: each entry kept with probability ``density`` and divided by it (so the mean is unchanged).

    Without a generator the draw uses torch's global one on the tensor's device, as peft does; a
    generator draws on its own device and the mask moves to the tensor.
    """
    if generator is None:
        mask = torch.bernoulli(torch.full_like(tensor, density))
    else:
        chances = torch.full(tensor.shape, density, dtype=tensor.dtype, device=generator.device)
        mask = torch.bernoulli(chances, generator=generator).to(tensor.device)
    return tensor * mask / density


def _sparsified(tensor: Tensor, op: Op, density: float | None, generator: torch.Generator | None) -> Tensor:
    if op.prune is None:
        return tensor
    assert density is not None  # checked with the arguments
    if density >= 1:  # nothing to drop, and no random draw (as peft: draws stay aligned with its)
        return tensor
    return keep_largest(tensor, density) if op.prune == "magnitude" else keep_random(tensor, density, generator)


def majority_agrees(stacked: Tensor, sign_method: str) -> Tensor:
    """Per entry, which adapters (dim 0) have the elected sign: the sign of the sum of the entries
    ("total") or of the count of signs ("frequency"), ties going to +. Pruned zeros never agree."""
    signs = stacked.sign()
    strength = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    return signs == torch.where(strength >= 0, 1, -1)


def mix(name: str, tensors: Sequence[Tensor], weights: Sequence[float], density: float | None,
        sign_method: str, generator: torch.Generator | None) -> Tensor:
    """The ``OPS[name]`` combination of ``tensors`` with ``weights``: sparsify each, weight, then
    sum, or (TIES) average over the adapters that agree with the sign elected from the unweighted
    sparsified tensors."""
    op = OPS[name]
    stacked = torch.stack([_sparsified(t, op, density, generator) for t in tensors], dim=0)
    factors = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * factors.view(-1, *(1,) * (stacked.dim() - 1))
    if not op.elect_sign:
        return weighted.sum(dim=0)
    agree = majority_agrees(stacked, sign_method)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def svd_factors(delta: Tensor, rank: int, clamp: float | None, full_matrices: bool,
                driver: str | None) -> tuple[Tensor, Tensor]:
    """``(B, A)`` of the best rank-``rank`` approximation of the 2-D ``delta``: ``B = U_r diag(S_r)``,
    ``A = Vh_r``. With ``clamp`` (a quantile in [0, 1]), the entries of both are clipped to
    ``±q``, ``q`` that quantile of all their entries together (as kohya's and peft's SVD merges)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    b = u[:, :rank] @ torch.diag(s[:rank])
    a = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return b, a


def product_norm(b: Tensor, a: Tensor, scaling: float) -> float:
    """``‖s B A‖_F`` from the small ``r x r`` Gram matrices (``‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)``), in fp64,
    without forming the ``out x in`` product."""
    b2, a2 = b.detach().flatten(1).double(), a.detach().flatten(1).double()
    squared = ((b2.T @ b2) * (a2 @ a2.T)).sum().clamp(min=0.0)
    return abs(scaling) * float(squared.sqrt())


def inverse_norm_weights(weights: Sequence[float], norms: Sequence[float]) -> list[float]:
    """``λ_i = w_i (1 / n_i) / Σ_j (1 / n_j)``: every adapter's change enters with the same size
    ``1 / Σ_j (1 / n_j)`` times its weight. An adapter whose change is zero here (``n_i = 0``) gets
    ``λ_i = 0`` and is left out of the sum; all zero gives all zero."""
    inverse = [1.0 / n if n > 0 else 0.0 for n in norms]
    total = sum(inverse)
    return [w * i / total if total > 0 else 0.0 for w, i in zip(weights, inverse)]
