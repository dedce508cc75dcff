"""The Fastfood random projection (Le et al. 2013), as used to train in a random subspace.

``Fastfood(d, D, seed)`` maps ``z`` in R^d to R^D without ever building the D x d matrix. ``z``
is zero-padded to ``L`` = the next power of two >= d, and ``n = ceil(D / L)`` independent blocks

    V_b = H G_b Pi_b H B_b / (||G_b|| sqrt(D))

are stacked; the first D of the ``n L`` rows are the output. H is the unnormalised L x L
Walsh-Hadamard matrix (Sylvester order), B_b a diagonal of random signs, Pi_b a random
permutation ((Pi v)_i = v[perm_i]) and G_b a diagonal of standard normals. Column j of
``H G_b Pi_b H B_b`` has squared norm exactly ``L ||G_b||^2`` (H has orthogonal rows of norm
sqrt(L), B and Pi are orthogonal), so with the divisor each block adds L / D to a column's squared
norm: every column has norm exactly 1 when L divides D, and squared norm 1 in expectation when the
last block is cut. So ``||P z|| ~ ||z||``, the scale of a dense N(0, 1/D) projection. This is
Le et al.'s ``1 / (sigma sqrt(L))`` normalisation with the Gaussian's norm in place of
sigma sqrt(L), and with one block it is the scaling of Aghajanyan et al.'s code
(``divisor * sqrt(D / L)`` with ``divisor = sqrt(L ||G||^2)``).

Memory is O(D): the signs, the scaled Gaussian diagonal and the permutation (int32 where it fits)
of every block; time O(D log L) per product, autograd included (the transform is linear, so its
backward is the transposed transform, which autograd derives from the same operations).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


FACTOR = 32
"""The largest Walsh-Hadamard factor applied as one matrix product (fastest on CPU, measured)."""


@functools.lru_cache(maxsize=64)
def sylvester(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The unnormalised ``size`` x ``size`` Walsh-Hadamard matrix: H_2n = [[H, H], [H, -H]]."""
    matrix = torch.ones(1, 1, dtype=dtype, device=device)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype, device=device)
    while matrix.shape[0] < size:
        matrix = torch.kron(step, matrix)
    return matrix


def hadamard(x: Tensor) -> Tensor:
    """``x @ H`` over the last dimension (a power of two L), H the unnormalised Sylvester Walsh-Hadamard
    matrix (symmetric, H H = L I), in O(L log L).

    H_L is the Kronecker product of small Sylvester factors (H_ab = H_a (x) H_b), so it is applied as
    a few products with matrices of at most FACTOR rows, one per factor: about 2 x 32 multiply-adds
    per value and factor, in matrix products, which runs several times faster on a CPU than the
    log2(L) add/subtract passes of the butterfly. Autograd keeps only the factors.
    """
    size = x.shape[-1]
    if size & (size - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {size}")
    lead, factor = x.shape[:-1], min(FACTOR, size)
    x = (x.reshape(-1, factor) @ sylvester(factor, x.dtype, x.device)).reshape(*lead, size)  # the innermost factor
    stride = factor
    while stride < size:  # each further factor acts on the axis of stride ``stride``
        factor = min(FACTOR, size // stride)
        block = x.reshape(*lead, size // (factor * stride), factor, stride)
        x = (sylvester(factor, x.dtype, x.device) @ block).reshape(*lead, size)
        stride *= factor
    return x


class Fastfood(nn.Module):
    """``z -> P z`` for the stacked Fastfood matrix P (D x d) drawn from ``seed`` (module docstring)."""

    def __init__(self, d: int, D: int, seed: int) -> None:
        super().__init__()
        if not 1 <= d <= D:
            raise ValueError(f"Fastfood needs 1 <= d <= D, got d={d}, D={D}")
        self.d, self.D, self.block = d, D, next_power_of_two(d)
        blocks = math.ceil(D / self.block)
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (blocks, self.block), generator=generator, dtype=torch.int8) * 2 - 1
        perm = torch.rand(blocks, self.block, generator=generator).argsort(dim=1)
        gauss = torch.randn(blocks, self.block, generator=generator)
        gauss = gauss / (gauss.norm(dim=1, keepdim=True) * math.sqrt(D))
        offsets = torch.arange(blocks).unsqueeze(1) * self.block  # Pi_b as indices into the flat (n L) vector
        index_type = torch.int32 if blocks * self.block < 2**31 else torch.int64
        self.signs: Tensor
        self.scaled_gauss: Tensor
        self.flat_perm: Tensor
        self.register_buffer("signs", signs.to(torch.float32), persistent=False)
        self.register_buffer("scaled_gauss", gauss, persistent=False)
        self.register_buffer("flat_perm", (perm + offsets).reshape(-1).to(index_type), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        padded = F.pad(z, (0, self.block - self.d))
        x = hadamard(self.signs * padded)  # H B_b z for every block b at once
        x = x.reshape(-1).index_select(0, self.flat_perm).view_as(x)
        x = hadamard(x * self.scaled_gauss)
        return x.reshape(-1)[:self.D]

    def extra_repr(self) -> str:
        return f"d={self.d}, D={self.D}, block={self.block}, blocks={self.signs.shape[0]}"
