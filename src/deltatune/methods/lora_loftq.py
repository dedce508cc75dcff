"""LoftQ init (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization").

QLoRA trains ``dequant(Q) + s B A`` with ``Q = NF4(W)`` and B = 0, so training starts from the
quantization error ``W - dequant(Q)``. LoftQ picks Q, A and B together: starting from ``R = W``,
repeat ``loftq_iter`` times: ``Q = NF4(R)``, and ``B A`` = the best rank-r approximation of
``W - dequant(Q)`` (SVD, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_rᵀ``), then ``R = W - B A``.
The base weight becomes ``dequant(Q)``; quantizing it with ``dt.quantize`` then gives back Q's
codes exactly (each block's absmax is one of its values, so it is found again).

As in peft 0.21 (``peft.utils.loftq_utils.loftq_init``), every step is peft's: NF4 in blocks of
64 without double quantization (bitsandbytes' ``Params4bit`` defaults; our format is bit-identical),
and B A, not ``s B A``, approximates the residual, so the init starts closest to W at
``s = lora_alpha / r = 1``. peft also offers 8 bits through bitsandbytes' int8 format, which
deltatune does not have: only ``loftq_bits=4``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..quant.blockwise import dequantize_4bit, quantize_4bit

LOFTQ_BITS = (4,)
"""The widths deltatune's LoftQ quantizes to (NF4)."""
LOFTQ_BLOCKSIZE = 64
"""bitsandbytes' ``Params4bit`` default block size, the one peft's LoftQ quantizes with."""


@dataclasses.dataclass(frozen=True)
class LoftQConfig:
    """peft's ``LoftQConfig``: pass as ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig())``."""

    loftq_bits: int = 4
    """Quantization bits (4: NF4)."""
    loftq_iter: int = 1
    """Alternations of quantization and SVD (1: quantize W, then the SVD of the error)."""


def loftq_dict(value: Any) -> Any:
    """``loftq_config`` as peft stores it: a ``LoftQConfig`` becomes its dict; anything else is kept
    as it is (a dict may leave out fields: they take LoftQConfig's defaults when the init runs)."""
    return dataclasses.asdict(value) if isinstance(value, LoftQConfig) else value


def loftq_setting(settings: Mapping[str, Any], field: str) -> Any:
    """One field of a ``loftq_config`` dict, LoftQConfig's default when it is left out."""
    return settings.get(field, getattr(LoftQConfig(), field))


def loftq_problem(settings: Any, needed: bool) -> tuple[str, str] | None:
    """(why, fix) when ``settings`` is not a valid ``loftq_config`` (an empty one only when
    ``needed``, i.e. for ``init_lora_weights="loftq"``), else None."""
    fix = "pass loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=1)"
    if not isinstance(settings, Mapping):
        return f"loftq_config must be a LoftQConfig or a dict of its fields, got {type(settings).__name__}", fix
    if not settings:
        return ("init_lora_weights='loftq' needs loftq_config (its bits and iterations)", fix) if needed else None
    unknown = sorted(map(str, set(settings) - {f.name for f in dataclasses.fields(LoftQConfig)}))
    if unknown:
        return f"loftq_config has keys LoftQConfig does not know: {unknown}", fix
    bits, iters = loftq_setting(settings, "loftq_bits"), loftq_setting(settings, "loftq_iter")
    if isinstance(bits, bool) or bits not in LOFTQ_BITS:
        return (f"loftq_bits={bits!r} is not supported: deltatune quantizes to 4-bit NF4 only "
                "(bitsandbytes' int8 format, peft's loftq_bits=8, is not implemented)"), "pass loftq_bits=4"
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        return f"loftq_iter={iters!r} must be a positive integer", "pass e.g. loftq_iter=1 (or 5, as in the paper)"
    return None


def nf4_round_trip(weight: Tensor) -> Tensor:
    """``dequant(NF4(weight))`` in fp32, as bitsandbytes' ``Params4bit`` (blocks of 64, no double quant)."""
    packed, state = quantize_4bit(weight, "nf4", LOFTQ_BLOCKSIZE, double_quant=False)
    return dequantize_4bit(packed, state)


def low_rank_split(residual: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(B, A) = (``U_r sqrt(S_r)``, ``sqrt(S_r) V_rᵀ``): the best rank-r approximation of ``residual``."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vh[:r]


def loftq_factors(weight: Tensor, r: int, settings: Mapping[str, int]) -> tuple[Tensor, Tensor, Tensor]:
    """(B, A, dequant(Q)) for the fp32 canonical ``weight`` (see the module docstring)."""
    target, iters = weight, loftq_setting(settings, "loftq_iter")
    for step in range(iters):
        dequantized = nf4_round_trip(target)
        b, a = low_rank_split(weight - dequantized, r)
        if step + 1 < iters:
            target = weight - torch.mm(b, a)
    return b, a, dequantized


def holds_nf4(weight: Tensor, dtype: torch.dtype) -> bool:
    """Whether the fp32 ``weight`` already is its own NF4 round trip, up to the rounding of the
    layer's ``dtype``: a 4-bit base, or a base a LoftQ init already quantized. Then LoftQ has no
    error to correct (B A = 0) and no full-precision weight to find it from."""
    round_trip = nf4_round_trip(weight)
    return torch.allclose(round_trip, weight, rtol=2 * torch.finfo(dtype).eps, atol=0)
