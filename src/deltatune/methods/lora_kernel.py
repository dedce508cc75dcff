"""One autograd function for a dense linear layer plus one LoRA adapter.

``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ``, computed with the operations peft uses, in its order (the base
product, then ``(h Bᵀ)·s`` added to it), so outputs equal peft's by construction on any machine:
no claim rests on how a BLAS library accumulates a product. Backward
keeps only ``x`` and the rank-r hidden ``x Aᵀ`` (the frozen W, A and B are referenced, not
copied) and computes, with ``g`` the output gradient and ``gB = g B``:

    dx = g W + s · gB A        (one mm, one addmm_ into it)
    dA = s · gBᵀ x             dB = s · gᵀ (x Aᵀ)
    dW = gᵀ x, db = Σ g        (only when the base weight or bias is trained)

Autograd through the generic path saves the same tensors, but its backward also makes a scaled
copy of ``g`` and sums the base and low-rank input gradients as two full-size tensors; see
docs/speed.md for the measurement.
Only for x and W of one dtype and A, B of that dtype or fp32 over a 16-bit base, without autocast
and without active dropout: the caller checks ``applies`` and otherwise takes the generic path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


HALF_DTYPES = (torch.float16, torch.bfloat16)


def applies(x: Tensor, weight: Tensor, a: Tensor, b: Tensor) -> bool:
    """Whether the fused function computes this call exactly as the generic path would: x and W
    in one dtype, A and B in that dtype too or in fp32 over a 16-bit base (peft's default adapter
    dtype for half-precision models), no autocast."""
    adapter_ok = a.dtype == b.dtype and (a.dtype == x.dtype or (a.dtype == torch.float32 and x.dtype in HALF_DTYPES))
    return (x.is_floating_point() and x.dtype == weight.dtype and adapter_ok
            and not torch.is_autocast_enabled(x.device.type) and x.dim() >= 1)


class LoraLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, a), b)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scaling: float) -> Tensor:
        y, hidden = base_plus_low_rank(x, weight, bias, a, b, scaling)
        ctx.save_for_backward(x, hidden, weight, a, b)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, hidden, weight, a, b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        grads = low_rank_backward(g, x, hidden, weight, a, b, ctx.scaling, (need_x, need_w, need_a, need_b))
        grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
        return grads[0], grads[1], grad_bias, grads[2], grads[3], None


def base_plus_low_rank(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                       scaling: float) -> tuple[Tensor, Tensor]:
    """``x Wᵀ + b + s · (x Aᵀ) Bᵀ`` rounded as peft rounds it, and the rank-r hidden ``x Aᵀ``.

    With an fp32 adapter on a 16-bit base, peft computes the low-rank term in fp32 on the upcast
    input, sums in fp32 and rounds the sum to the base dtype; so does this (the sum is made in one
    fp32 buffer instead of three).
    """
    y = F.linear(x, weight, bias)
    hidden = F.linear(x.to(a.dtype), a)
    total = y.to(a.dtype)  # y itself when the dtypes agree
    total.add_(F.linear(hidden, b).mul_(scaling))  # y + (h Bᵀ)·s: peft's operations in peft's order
    return total.to(y.dtype), hidden


def low_rank_backward(g: Tensor, x: Tensor, hidden: Tensor, weight: Tensor, a: Tensor, b: Tensor,
                      s: float | Tensor, needs: tuple[bool, bool, bool, bool]) -> tuple[Tensor | None, ...]:
    """Gradients of x, W, A and B (None where not needed) for ``z = x Wᵀ + s · (x Aᵀ) Bᵀ`` given
    ``g = dL/dz`` as a 2-D ``(tokens, out)`` tensor. ``s`` may be a 0-dim tensor (a scale held for
    hot-swaps, ``lora_slot``): ``addmm_`` takes only a number as ``alpha``, so the product is then
    scaled on its own (a compiled backward cannot read the tensor's value)."""
    need_x, need_w, need_a, need_b = needs
    x2 = x.reshape(-1, x.shape[-1])
    g_wide = g.to(a.dtype)  # an fp32 adapter over a 16-bit base works in fp32, as in peft
    g_b = g_wide @ b  # (tokens, r): the output gradient seen by the rank-r hidden
    grad_x = grad_w = grad_a = grad_b = None
    if need_x:
        grad_x = g @ weight
        if a.dtype == g.dtype and not isinstance(s, Tensor):
            grad_x.addmm_(g_b, a, alpha=s)
        else:  # the adapter's share rounded to the base dtype, then added (peft's order)
            grad_x.add_((g_b @ a).mul_(s).to(grad_x.dtype))
        grad_x = grad_x.view(x.shape)
    if need_w:
        grad_w = g.t() @ x2
    if need_a:
        grad_a = (g_b.t() @ x2.to(a.dtype)).mul_(s)
    if need_b:
        grad_b = (g_wide.t() @ hidden.reshape(-1, hidden.shape[-1])).mul_(s)
    return grad_x, grad_w, grad_a, grad_b


class DoraLinear(torch.autograd.Function):
    """DoRA on a dense linear layer: ``g ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b`` with ``g = m / norm``, the
    norm ``||W + s B A||`` computed by the caller and held constant (as DoRA prescribes).

    Saves x, the rank-r hidden and ``z = x Wᵀ + s · (x Aᵀ) Bᵀ`` (the magnitude's gradient is
    ``Σ_tokens dL/dy ⊙ z / norm``); backward is LoRA's with ``dL/dz = dL/dy ⊙ g``. The generic
    path computes the same through five autograd nodes and three more full-size tensors.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                magnitude: Tensor, norm: Tensor, scaling: float) -> Tensor:
        z, hidden = base_plus_low_rank(x, weight, None, a, b, scaling)
        g = magnitude.reshape(-1) / norm
        y = z * g if bias is None else torch.addcmul(bias, z, g)
        ctx.save_for_backward(x, hidden, z, weight, a, b, g, norm)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.magnitude_shape = magnitude.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, hidden, z, weight, a, b, g, norm = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_m, _, _ = ctx.needs_input_grad
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_m = None
        if need_m:
            grad_m = ((grad2 * z.reshape(grad2.shape)).sum(0) / norm).view(ctx.magnitude_shape)
        grads = low_rank_backward(grad2 * g, x, hidden, weight, a, b, ctx.scaling,
                                  (need_x, need_w, need_a, need_b))
        grad_bias = grad2.sum(0) if need_bias and ctx.has_bias else None
        return grads[0], grads[1], grad_bias, grads[2], grads[3], grad_m, None, None
