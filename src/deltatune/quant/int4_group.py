"""Asymmetric INT4 grouped along the input dimension (the format QA-LoRA's merge needs).

``W[o, i] = scale[o, g] * q[o, i] + offset[o, g]`` with ``g = i // group_size`` and codes
``q`` in 0..15, two per byte (the even input index in the low nibble). ``scale`` and ``offset``
are fp32 per (output, group): the min/max of each group maps onto 0 and 15. Because ``offset``
is a float, a change that is constant within each group (a QA-LoRA adapter's ``ΔW``) folds into
it exactly up to one float addition, and the codes never change.
"""

from __future__ import annotations

import torch
from torch import Tensor

LEVELS = 15
"""The largest code: 4 bits give 0..15."""


def check_group_size(in_features: int, group_size: int) -> str | None:
    """Why ``group_size`` cannot group ``in_features`` inputs, or None when it can."""
    if group_size < 2 or group_size % 2:
        return f"the group size must be an even integer >= 2, got {group_size}"
    if in_features % group_size:
        return f"{in_features} input features do not split into groups of {group_size}"
    return None


def quantize_int4_group(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(packed uint8 (out, in / 2), scale (out, in / G), offset (out, in / G))`` for an ``(out, in)`` weight."""
    out_features, in_features = weight.shape
    problem = check_group_size(in_features, group_size)
    if problem is not None:
        raise ValueError(problem)
    groups = weight.detach().float().view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = (high - low) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0, offset exact
    codes = ((groups - low.unsqueeze(2)) / scale.unsqueeze(2)).round().clamp(0, LEVELS).to(torch.uint8)
    codes = codes.view(out_features, in_features)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), scale.contiguous(), low.contiguous()


def unpack_codes(packed: Tensor) -> Tensor:
    """The ``(out, in)`` codes 0..15 of a packed ``(out, in / 2)`` uint8 tensor."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=2).view(packed.shape[0], 2 * packed.shape[1])


def dequantize_int4_group(packed: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense ``(out, in)`` weight in ``dtype``: ``scale * q + offset`` per group, computed in fp32."""
    codes = unpack_codes(packed).float()
    out_features, groups = scale.shape
    grouped = codes.view(out_features, groups, -1) * scale.unsqueeze(2) + offset.unsqueeze(2)
    return grouped.view(out_features, -1).to(dtype)
