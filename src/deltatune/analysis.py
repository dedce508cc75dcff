"""ΔW analysis: the dense change each adapter makes to each layer, its size and its rank.

Works for every weight-space method through ``WeightDelta.delta_weight``: ΔW on the layer's
canonical dense weight (fp32), so no method is named here. ``spectrum.py`` builds the full
singular-value analysis on the same ΔW.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import AdapterError
from .layer import WeightDelta
from .state import delta_layers


@dataclass(frozen=True)
class LayerDelta:
    """The change adapter ``name`` makes to one layer."""

    module: str
    shape: tuple[int, ...]
    norm: float
    """Frobenius norm of ΔW."""
    relative_norm: float
    """||ΔW|| / ||W||."""
    effective_rank: float
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007)."""
    rank: int
    """Singular values above max(shape) * eps * the largest one."""


COLUMNS = ("||dW|| = Frobenius norm of the layer's weight change ΔW; rel = ||ΔW|| / ||W|| (size of the change "
           "against the frozen weight); eff.rank = exp(entropy of σ_i / Σσ) (Roy & Vetterli 2007): how many "
           "directions ΔW spreads over, at most rank; rank = singular values of ΔW above max(shape)·eps·σ_max")
"""What the columns of ``deltatune inspect``'s ΔW table mean."""


@torch.no_grad()
def delta_matrix(delta: WeightDelta, weight: Tensor) -> Tensor:
    """ΔW as a matrix (convolution kernels flattened to (out, in * k))."""
    return delta.delta_weight(weight).reshape(weight.shape[0], -1)


def effective_rank(singular_values: Tensor) -> float:
    """exp of the Shannon entropy of the singular-value distribution; 0 for a zero matrix."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(singular_values: Tensor, shape: tuple[int, ...]) -> int:
    """Singular values (descending) above max(shape) * eps * the largest one: numpy's matrix_rank rule."""
    if not singular_values.numel():
        return 0
    tol = max(shape) * torch.finfo(singular_values.dtype).eps * float(singular_values[0])
    return int((singular_values > tol).sum())


@torch.no_grad()
def weight_changes(model: nn.Module, name: str) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(module, base weight, ΔW as a matrix), in fp32, for every layer adapter ``name`` changes
    and has not merged."""
    for key, layer in delta_layers(model):
        if name not in layer.deltas or name in layer.merged:
            continue
        delta = layer.delta(name)
        if not isinstance(delta, WeightDelta):
            raise AdapterError(f"adapter {name!r} is not a weight change ({type(delta).__name__} on {key!r}): "
                               "it has no ΔW to analyse")
        weight = layer.view.read_weight().float()
        yield key, weight, delta_matrix(delta, weight)


@torch.no_grad()
def layer_deltas(model: nn.Module, name: str) -> list[LayerDelta]:
    """Size and rank of ΔW for every layer adapter ``name`` changes."""
    report = []
    for key, weight, dw in weight_changes(model, name):
        s = torch.linalg.svdvals(dw)
        norm = float(dw.norm())
        report.append(LayerDelta(key, tuple(weight.shape), norm, norm / max(float(weight.norm()), 1e-30),
                                 effective_rank(s), numerical_rank(s, tuple(dw.shape))))
    return report
