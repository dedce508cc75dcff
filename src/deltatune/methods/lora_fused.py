"""LoRA and DoRA alone on a dense linear layer: base and change in one autograd function.

Registered in ``layer.FUSED_FORWARD`` for (LoraDelta, "linear") and (DoraDelta, "linear"), so the
generic layer takes this path when one such delta runs alone; every other case (several adapters,
active dropout, autocast, mixed dtypes, 4-bit bases) takes the generic path, which computes the same.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layer import register_fused
from . import lora_kernel
from .dora import DoraDelta
from .lora import LoraDelta


def fused_weight(delta: LoraDelta, x: Tensor) -> Tensor | None:
    """The base weight when a ``lora_kernel`` function computes this call exactly as the generic
    path would (dense linear base, no active dropout, dtypes as ``lora_kernel.applies`` allows), else None."""
    if not delta.base.dense_linear or (delta.training and isinstance(delta.dropout, nn.Dropout)):
        return None
    weight = delta.base.read_weight()
    return weight if lora_kernel.applies(x, weight, delta.A, delta.B) else None


def fused_lora(delta: LoraDelta, x: Tensor) -> Tensor | None:
    """Base + LoRA in one autograd function (``lora_kernel.LoraLinear``)."""
    weight = fused_weight(delta, x)
    if weight is None:
        return None
    return lora_kernel.LoraLinear.apply(x, weight, delta.base.bias, delta.A, delta.B, delta.scaling)


def fused_dora(delta: DoraDelta, x: Tensor) -> Tensor | None:
    """Base, LoRA and the magnitude in one autograd function (``lora_kernel.DoraLinear``)."""
    weight = fused_weight(delta, x)
    if weight is None or delta.magnitude.dtype != x.dtype:
        return None
    return lora_kernel.DoraLinear.apply(x, weight, delta.base.bias, delta.A, delta.B, delta.magnitude,
                                        delta.weight_norm(weight), delta.scaling)


register_fused(LoraDelta, "linear", fused_lora)
register_fused(DoraDelta, "linear", fused_dora)
