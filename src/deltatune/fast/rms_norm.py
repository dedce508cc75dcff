"""RMSNorm (LLaMA's ``weight * x / sqrt(mean(x²) + eps)``) as one autograd function.

The stock module is five tensor operations, and autograd records each: backward then runs
about eight full-size passes. Here forward keeps ``x`` and the per-row ``1/rms`` only, and
backward is three passes: with ``n`` the hidden size and ``gw = g * w``,

    dx = r · (gw - x · r² · (gw · x) / n)        dw = Σ g · x · r   (only when w is trained)

Same-dtype fp32/fp64 inputs only (a half-precision input is normalized in fp32 by the stock
module, which ``applies`` leaves to it).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, inv_rms, weight)
        return (x * inv_rms).mul_(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, inv_rms, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x * inv_rms).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gw = grad * weight
            coef = torch.linalg.vecdot(gw, x).unsqueeze(-1).mul_(inv_rms.pow(2)).div_(-x.shape[-1])
            grad_x = torch.addcmul(gw, x, coef).mul_(inv_rms)
        return grad_x, grad_w, None


def applies(x: Tensor, weight: Tensor) -> bool:
    return x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64)


def fused_rms_norm_forward(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The replacement ``forward`` of one LLaMA-style RMSNorm module (``weight``, ``variance_epsilon``)."""
    stock = type(module).forward

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        weight: Tensor = self.weight  # type: ignore[assignment]
        if not applies(x, weight):
            return stock(self, x)
        return RMSNormFunction.apply(x, weight, float(self.variance_epsilon))  # type: ignore[arg-type]

    return types.MethodType(forward, module)
