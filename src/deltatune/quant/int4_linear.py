"""``Int4GroupLinear``: a frozen linear layer in the asymmetric INT4 group format, and its base kind.

Forward dequantizes ``scale * q + offset`` to the compute dtype inside one autograd node that
keeps only the packed codes and the per-group floats for backward (as ``linear.Dequantized``).
Merging adapters with ``requantize=True`` folds a change that is constant within every group of
``group_size`` inputs (what a QA-LoRA adapter with a matching or multiple group size makes) into
``offset`` and keeps the codes byte for byte; any other change is re-quantized, lossy, with the
measured error in a warning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bases import register_base_kind
from .int4_group import dequantize_int4_group, quantize_int4_group
from .merge import dense_linear, warn_requantized
from .view import Linear4bitBase

_FLOAT_BUFFERS = ("scale", "offset")
"""Buffers that stay fp32: ``model.half()`` must not round the format's scales and offsets."""


class DequantizedInt4(torch.autograd.Function):
    """``x @ (scale * q + offset).T + b`` that keeps only the packed codes and group floats for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, scale: Tensor, offset: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(packed, scale, offset)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_int4_group(packed, scale, offset, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, Tensor | None]:
        packed, scale, offset = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_int4_group(packed, scale, offset, grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias


class Int4GroupLinear(nn.Module):
    """A linear layer whose weight is ``scale[o, i // G] * q[o, i] + offset[o, i // G]`` (see ``int4_group``)."""

    weight: Tensor
    scale: Tensor
    offset: Tensor
    quant_type = "int4_group"

    def __init__(self, packed: Tensor, scale: Tensor, offset: Tensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features, groups = scale.shape
        self.in_features = 2 * packed.shape[1]
        self.group_size = self.in_features // groups
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", packed)
        self.register_buffer("scale", scale.float())
        self.register_buffer("offset", offset.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, group_size: int,
                    compute_dtype: torch.dtype | None = None) -> Int4GroupLinear:
        """Quantize a dense ``(out, in)`` weight (min/max per group of ``group_size`` inputs)."""
        packed, scale, offset = quantize_int4_group(weight, group_size)
        return cls(packed, scale, offset, bias, compute_dtype or weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``(out, in)`` weight in ``dtype`` (default: the compute dtype)."""
        return dequantize_int4_group(self.weight, self.scale, self.offset, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = DequantizedInt4.apply(x.to(self.compute_dtype), self.weight, self.scale, self.offset, bias)
        return out.to(x.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Int4GroupLinear:
        kept = {name: getattr(self, name) for name in _FLOAT_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            if getattr(self, name).dtype != old.dtype:  # a dtype cast: move only
                setattr(self, name, old.to(getattr(self, name).device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type=int4_group, group_size={self.group_size}, compute_dtype={self.compute_dtype}")


def group_constant_change(layer: Int4GroupLinear, change: Tensor) -> Tensor | None:
    """The per-group value of ``change`` (fp32, ``(out, in)``), or None when it varies within a group by more
    than the rounding of forming ``W + ΔW`` in fp32 (then it cannot fold into the offsets)."""
    grouped = change.view(layer.out_features, -1, layer.group_size)
    mean = grouped.mean(dim=2)
    spread = (grouped - mean.unsqueeze(2)).abs().amax(dim=2)
    # |fl(W + ΔW) - W - ΔW| <= eps * |W + ΔW| per entry; allow a few such roundings
    allowed = 4 * torch.finfo(torch.float32).eps * (layer.dequantize(torch.float32).abs() + change.abs()).view(
        grouped.shape).amax(dim=2)
    return mean if bool((spread <= allowed).all()) else None


def folded(layer: Int4GroupLinear, offset_change: Tensor, bias: Tensor | None) -> Int4GroupLinear:
    """A new layer with the same codes and scales and ``offset + offset_change``."""
    new = Int4GroupLinear(layer.weight.clone(), layer.scale.clone(), layer.offset + offset_change,
                          bias if bias is not None else layer.bias, layer.compute_dtype)
    return new.to(layer.weight.device)


def requantized_int4(layer: Int4GroupLinear, weight: Tensor, bias: Tensor | None) -> Int4GroupLinear:
    """``weight`` quantized again in the layer's format; warns with the error that adds."""
    new = Int4GroupLinear.from_weight(weight.float(), bias if bias is not None else layer.bias, layer.group_size,
                                      layer.compute_dtype)
    warn_requantized(new, weight, "int4_group", f" (the change is not constant within groups of {layer.group_size} "
                     "inputs, so it cannot fold into the offsets; for a lossless 4-bit merge train with LoraConfig("
                     f"use_qalora=True, qalora_group_size={layer.group_size}) or a multiple of it)")
    return new.to(layer.weight.device)


class Int4GroupBase(Linear4bitBase):
    """``Int4GroupLinear`` as the adapters see it: its dequantized weight; not writable in place (as NF4)."""

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return isinstance(module, Int4GroupLinear)

    def merged_module(self, canonical: Tensor | None, bias: Tensor | None, requantize: bool) -> nn.Module:
        layer: Int4GroupLinear = self.module  # type: ignore[assignment]
        if not requantize:
            return dense_linear(layer, canonical, bias)
        if canonical is None:
            return layer if bias is None else folded(layer, torch.zeros_like(layer.offset), bias)
        per_group = group_constant_change(layer, canonical.float() - self.read_weight().float())
        return requantized_int4(layer, canonical, bias) if per_group is None else folded(layer, per_group, bias)

    def describe(self) -> str:
        return f"Int4GroupLinear({self.in_features} -> {self.out_features}, group_size {self.module.group_size})"


register_base_kind(Int4GroupBase)
