"""One autograd function for a dense linear layer plus one LoRA adapter.

``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ``, computed as the base product with the scaled low-rank term
added into it in place, in the order peft rounds it (outputs stay bit-identical). Backward
keeps only ``x`` and the rank-r hidden ``x Aᵀ`` (the frozen W, A and B are referenced, not
copied) and computes, with ``g`` the output gradient and ``gB = g B``:

    dx = g W + s · gB A        (one mm, one addmm_ into it)
    dA = s · gBᵀ x             dB = s · gᵀ (x Aᵀ)
    dW = gᵀ x, db = Σ g        (only when the base weight or bias is trained)

Autograd through the generic path saves the same tensors, but its backward also makes a scaled
copy of ``g`` and sums the base and low-rank input gradients as two full-size tensors; see
docs/speed.md for the measurement.
Only for same-dtype tensors, without autocast and without active dropout: the caller checks
``applies`` and otherwise takes the generic path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def applies(x: Tensor, weight: Tensor, a: Tensor, b: Tensor) -> bool:
    """Whether the fused function computes this call exactly as the generic path would."""
    return (x.is_floating_point() and x.dtype == weight.dtype == a.dtype == b.dtype
            and not torch.is_autocast_enabled(x.device.type) and x.dim() >= 1)


class LoraLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, a), b)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scaling: float) -> Tensor:
        y = F.linear(x, weight, bias)
        hidden = F.linear(x, a)
        # y + (h Bᵀ)·s in peft's rounding order (an addmm_ with alpha=s measured 1-3% faster per
        # step but rounds differently; outputs identical to peft's are worth more)
        y.add_(F.linear(hidden, b).mul_(scaling))
        ctx.save_for_backward(x, hidden, weight, a, b)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, hidden, weight, a, b = ctx.saved_tensors
        s: float = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        g_b = g @ b  # (tokens, r): the output gradient seen by the rank-r hidden
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = (g @ weight).addmm_(g_b, a, alpha=s).view(x.shape)
        if need_a:
            grad_a = (g_b.t() @ x2).mul_(s)
        if need_b:
            grad_b = (g.t() @ hidden.reshape(-1, hidden.shape[-1])).mul_(s)
        if need_w:
            grad_w = g.t() @ x2
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None
