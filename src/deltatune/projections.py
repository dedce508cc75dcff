"""Random projections R^d -> R^D for training in a subspace: Fastfood, or a dense Gaussian matrix.

Both are fixed functions of (d, D, seed) and scaled so that every column of P has norm ~ 1
(``||P z|| ~ ||z||``), so a learning rate means the same with either.

``DenseGaussian`` has entries N(0, 1/D) and never holds the D x d matrix: it is drawn in row
chunks (each from its own generator, seeded from (seed, chunk)), the product ``P z`` adds chunk
by chunk, and the backward ``P^T g`` draws the same chunks again. Memory is one chunk
(``CHUNK_VALUES`` floats) instead of D d; time is that of drawing D d normals per forward and per
backward, so it suits small D d (tests, small models) and serves as the oracle for Fastfood.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .fastfood import Fastfood

CHUNK_VALUES = 1 << 22
"""Matrix entries drawn at once (16 MiB of float32)."""
PROJECTIONS = ("fastfood", "dense")


def chunk_seed(seed: int, chunk: int) -> int:
    """A generator seed for chunk ``chunk`` of the matrix of ``seed`` (distinct for distinct pairs
    of non-negative values below 2^31, and within the range ``manual_seed`` takes)."""
    return (seed % (1 << 31)) * (1 << 31) + chunk


class DenseGaussian(nn.Module):
    """``z -> P z`` for P (D x d) with i.i.d. N(0, 1/D) entries drawn from ``seed`` (module docstring)."""

    def __init__(self, d: int, D: int, seed: int) -> None:
        super().__init__()
        if not 1 <= d <= D:
            raise ValueError(f"a dense projection needs 1 <= d <= D, got d={d}, D={D}")
        self.d, self.D, self.seed = d, D, seed
        self.rows = max(1, CHUNK_VALUES // d)

    def chunks(self, device: torch.device | None = None) -> Iterator[tuple[int, Tensor]]:
        """(first row, rows x d block of P), top to bottom."""
        for index, start in enumerate(range(0, self.D, self.rows)):
            rows = min(self.rows, self.D - start)
            generator = torch.Generator().manual_seed(chunk_seed(self.seed, index))
            block = torch.randn(rows, self.d, generator=generator) / math.sqrt(self.D)
            yield start, block.to(device)

    def matrix(self) -> Tensor:
        """P itself (D x d): only for small D d (tests)."""
        return torch.cat([block for _, block in self.chunks()])

    def forward(self, z: Tensor) -> Tensor:
        out: Tensor = _ChunkedProduct.apply(z, self)
        return out


class _ChunkedProduct(torch.autograd.Function):
    """P z forward, P^T g backward, drawing P chunk by chunk both times (nothing of P is saved)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, projection: DenseGaussian) -> Tensor:
        ctx.projection = projection
        out = z.new_empty(projection.D)
        for start, block in projection.chunks(z.device):
            out[start:start + block.shape[0]] = block.to(z.dtype) @ z
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        projection: DenseGaussian = ctx.projection
        total = grad.new_zeros(projection.d)
        for start, block in projection.chunks(grad.device):
            total += grad[start:start + block.shape[0]] @ block.to(grad.dtype)
        return total, None


def make_projection(kind: str, d: int, D: int, seed: int) -> nn.Module:
    """The projection ``kind`` (one of PROJECTIONS) for R^d -> R^D."""
    if kind == "fastfood":
        return Fastfood(d, D, seed)
    if kind == "dense":
        return DenseGaussian(d, D, seed)
    raise ValueError(f"unknown projection {kind!r}; use one of {PROJECTIONS}")
