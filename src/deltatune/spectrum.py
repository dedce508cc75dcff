"""The singular-value spectrum of each layer's ΔW, the subspace similarity of two adapters, and how
ΔW amplifies directions of W (Hu et al. 2021, arXiv:2106.09685, sections 7.2 and 7.3).

Everything works on the dense ΔW that ``analysis.weight_changes`` gives for any weight-space
method, so no method is named here. ``spectrum_report.py`` turns the results into JSON, text
and plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .adapters import adapter_names
from .analysis import numerical_rank, weight_changes
from .errors import AdapterError

Side = Literal["right", "left"]
SIDES: tuple[Side, ...] = ("right", "left")
"""right: ΔW's right singular vectors, the input subspace (the paper's choice, from A); left: the output subspace."""
ENERGY_KS = (1, 2, 4, 8, 16)
MAX_VECTORS = 64
"""Singular vectors kept per layer for subspace similarity (the paper compares r = 8 with r = 64)."""


@dataclass(frozen=True)
class Amplification:
    """How ΔW relates to W's directions (section 7.3), with U, V the top-``rank`` singular vectors."""

    rank: int
    weight_norm: float
    """||W||_F."""
    delta_norm: float
    """||ΔW||_F."""
    on_delta: float
    """||U^T W V||_F with U, V from ΔW: how much of W lies along ΔW's directions."""
    on_weight: float
    """The same with W's own top-``rank`` singular vectors (= the norm of W's top ``rank`` singular values)."""
    on_random: float
    """The same with random orthonormal U, V (seeded), the paper's baseline."""

    @property
    def factor(self) -> float:
        """||ΔW||_F / ||U^T W V||_F: how strongly ΔW amplifies the directions it shares with W."""
        return self.delta_norm / self.on_delta if self.on_delta > 0 else math.inf


@dataclass(frozen=True, eq=False)
class LayerSpectrum:
    """ΔW of one layer: every singular value (descending) and the top singular vectors."""

    module: str
    shape: tuple[int, int]
    """ΔW as a matrix: (out, in), convolution kernels flattened into in."""
    singular_values: Tensor
    rank: int
    """Singular values above max(shape) * eps * the largest one."""
    left: Tensor
    """(out, v): the top v = min(rank, max_vectors) left singular vectors (output subspace)."""
    right: Tensor
    """(in, v): the top v right singular vectors (input subspace)."""
    amplification: Amplification

    def energy(self, k: int) -> float | None:
        """Share of ||ΔW||_F^2 in the top ``k`` singular values; None when ΔW is zero."""
        if k < 1:
            raise AdapterError(f"energy needs k >= 1, got {k}")
        squares = self.singular_values.double() ** 2
        total = float(squares.sum())
        return float(squares[:k].sum()) / total if total > 0 else None

    def cumulative_energy(self) -> Tensor:
        """energy(k) for k = 1 .. len(singular_values) (zeros when ΔW is zero)."""
        squares = self.singular_values.double() ** 2
        total = float(squares.sum())
        return squares.cumsum(0) / total if total > 0 else torch.zeros_like(squares)

    def vectors(self, side: Side) -> Tensor:
        return self.right if side == "right" else self.left


@dataclass(frozen=True)
class AdapterSpectrum:
    """The spectra of every layer one adapter changes."""

    adapter: str
    layers: tuple[LayerSpectrum, ...]

    def energy(self, k: int) -> list[float]:
        """energy(k) of every layer whose ΔW is not zero."""
        return [e for e in (layer.energy(k) for layer in self.layers) if e is not None]


@dataclass(frozen=True, eq=False)
class LayerSimilarity:
    """phi(i, j) for one layer: ``grid[i - 1, j - 1]``, i over the first adapter's top vectors, j the second's."""

    module: str
    side: Side
    grid: Tensor

    def phi(self, i: int, j: int) -> float:
        return float(self.grid[i - 1, j - 1])


@torch.no_grad()
def spectrum(model: nn.Module, name: str = "default", max_vectors: int = MAX_VECTORS,
             amplification_rank: int | None = None, seed: int = 0) -> AdapterSpectrum:
    """The ΔW spectrum of every layer adapter ``name`` changes in ``model``.

    ``amplification_rank``: r for section 7.3's projections (default: each layer's numerical rank
    of ΔW, at most ``max_vectors``). ``seed`` draws the random directions of the baseline.
    Raises AdapterError for an unknown adapter or one that changes no weight (prompts, biases,
    inserted blocks): those have no ΔW.
    """
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r} in the model; it has {adapter_names(model)}")
    if max_vectors < 1 or (amplification_rank is not None and amplification_rank < 1):
        raise AdapterError(f"max_vectors and amplification_rank must be >= 1, got {max_vectors}, "
                           f"{amplification_rank}")
    generator = torch.Generator().manual_seed(seed)
    layers = tuple(_layer_spectrum(key, weight.reshape(weight.shape[0], -1), dw, max_vectors, amplification_rank,
                                   generator) for key, weight, dw in weight_changes(model, name))
    if not layers:
        raise AdapterError(f"adapter {name!r} changes no layer's weight (it works on inputs, activations or "
                           "biases, or is merged), so it has no ΔW spectrum; analyse a weight-space adapter, "
                           "unmerged")
    return AdapterSpectrum(name, layers)


def _layer_spectrum(key: str, weight: Tensor, dw: Tensor, max_vectors: int, amplification_rank: int | None,
                    generator: torch.Generator) -> LayerSpectrum:
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    rank = numerical_rank(s, tuple(dw.shape))
    keep = min(rank, max_vectors)
    r = min(amplification_rank or keep, s.numel())  # a zero ΔW has no directions: r = 0
    amplification = _amplification(weight, dw, u[:, :r], vh[:r].T, generator)
    return LayerSpectrum(key, (dw.shape[0], dw.shape[1]), s, rank, u[:, :keep].clone(), vh[:keep].T.clone(),
                         amplification)


def _amplification(weight: Tensor, dw: Tensor, u: Tensor, v: Tensor, generator: torch.Generator) -> Amplification:
    """Section 7.3: ||U^T W V||_F for ΔW's, W's own and random r-dimensional directions."""
    r = u.shape[1]
    own = torch.linalg.svdvals(weight)[:r]
    random_u = torch.linalg.qr(torch.randn(weight.shape[0], r, generator=generator)).Q
    random_v = torch.linalg.qr(torch.randn(weight.shape[1], r, generator=generator)).Q
    return Amplification(r, float(weight.norm()), float(dw.norm()), _projected_norm(weight, u, v),
                         float(own.norm()), _projected_norm(weight, random_u, random_v))


def _projected_norm(weight: Tensor, u: Tensor, v: Tensor) -> float:
    return float((u.T @ weight @ v).norm())


def phi_grid(a: Tensor, b: Tensor) -> Tensor:
    """phi(i, j) = ||a[:, :i]^T b[:, :j]||_F^2 / min(i, j) for every i, j (section 7.2), in float64.

    ``a`` and ``b`` hold orthonormal columns (most important first); phi is in [0, 1]: 1 when one
    subspace contains the other, 0 when they are orthogonal.
    """
    if a.shape[0] != b.shape[0]:
        raise AdapterError(f"cannot compare subspaces of R^{a.shape[0]} and R^{b.shape[0]}: the layers differ")
    overlap = (a.double().T @ b.double()) ** 2
    sums = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, a.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, b.shape[1] + 1, dtype=torch.float64)[None, :]
    return sums / torch.minimum(i, j)


def subspace_similarity(first: AdapterSpectrum, second: AdapterSpectrum, side: Side = "right",
                        layers: Sequence[str] | None = None) -> list[LayerSimilarity]:
    """phi over i, j for every layer both adapters change (or the ``layers`` named), from
    ``spectrum`` of each (same model or two). Layers where either ΔW is zero are left out."""
    if side not in SIDES:
        raise AdapterError(f"side must be one of {SIDES}, got {side!r}")
    theirs = {layer.module: layer for layer in second.layers}
    wanted = list(layers) if layers is not None else [layer.module for layer in first.layers if layer.module in theirs]
    mine = {layer.module: layer for layer in first.layers}
    missing = [key for key in wanted if key not in mine or key not in theirs]
    if missing or not wanted:
        raise AdapterError(f"adapters {first.adapter!r} and {second.adapter!r} share no changed layer "
                           f"{'named ' + str(missing) if missing else ''}; compare adapters on the same modules")
    return [LayerSimilarity(key, side, phi_grid(mine[key].vectors(side), theirs[key].vectors(side)))
            for key in wanted if mine[key].rank and theirs[key].rank]


def mean_grid(similarities: Sequence[LayerSimilarity]) -> Tensor:
    """phi averaged over layers, on the grid every layer has (the smallest i and j)."""
    if not similarities:
        raise AdapterError("no layer to average: every compared ΔW is zero")
    rows = min(s.grid.shape[0] for s in similarities)
    cols = min(s.grid.shape[1] for s in similarities)
    return torch.stack([s.grid[:rows, :cols] for s in similarities]).mean(0)
