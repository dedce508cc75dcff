"""The code books of the 4-bit and 8-bit formats, built exactly as bitsandbytes 0.50 builds them.

A code book maps a small integer (the stored code) to a value in [-1, 1] that is then scaled by
its block's absmax. NF4 (Dettmers et al. 2023, "QLoRA") places its 16 values at quantiles of a
standard normal, so Gaussian weights use every code equally often; FP4 is a 1-2-1 bit float
(sign, exponent, mantissa) normalised to [-1, 1]; the dynamic 8-bit map (Dettmers 2016,
"8-Bit Approximations for Parallelism in Deep Learning") has a variable split between exponent
and fraction and serves the double quantization of absmax and the 8-bit optimizer states.

Rounding to the nearest code is done by ``bucketize`` against the midpoints of the sorted code,
as bitsandbytes does; the code books are cached per device because every quantize uses them.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
"""bitsandbytes' NF4 table (create_normal_map(offset=0.9677083, use_extra_value=True)), sorted."""

_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
"""FP4 in bit-pattern order (bit 3 = sign), before normalising by the largest magnitude."""

QUANT_TYPES = ("nf4", "fp4")


@cache
def code_4bit(quant_type: str, device: torch.device = torch.device("cpu")) -> Tensor:
    """The 16 fp32 values of a 4-bit code book, indexed by the stored nibble."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not a 4-bit format; use one of {QUANT_TYPES}")
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, device=device)
    return data.div_(data.abs().max())  # bitsandbytes normalises in place in fp32; NF4 is unchanged


@cache
def rounding_4bit(quant_type: str, device: torch.device = torch.device("cpu")) -> tuple[Tensor, Tensor]:
    """Midpoints between neighbouring sorted code values, and the nibble of each sorted position.

    FP4 is not stored in value order (and holds +0 and -0), so a bucket index is mapped back to
    its nibble through the same ``argsort`` bitsandbytes uses; for NF4 the order is the identity.
    """
    code = code_4bit(quant_type, device)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


@cache
def dynamic_map(signed: bool = True, device: torch.device = torch.device("cpu")) -> Tensor:
    """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: 256 sorted fp32 values.

    Built with the same fp32 tensor arithmetic and the same Python float steps, so every value
    is bit-identical to the table bitsandbytes stores as ``nested_quant_map``.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        data += _scaled_means(int(items), i, max_exponent_bits, signed)
    data += [0.0, 1.0]  # with 7 exponent bits there are no extra linear-region items
    data += [0.0] * (256 - len(data))  # the unsigned map has fewer values; bitsandbytes pads with zeros
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


def _scaled_means(items: int, i: int, max_exponent_bits: int, signed: bool) -> list[float]:
    boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    scale = 10 ** (-(max_exponent_bits - 1) + i)
    values: list[float] = (scale * means).tolist()
    if signed:
        values += (-scale * means).tolist()
    return values
