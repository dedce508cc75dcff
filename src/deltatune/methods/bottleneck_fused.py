"""One serial bottleneck adapter in AdapterHub's Pfeiffer placement at a post-LN site, as one autograd Function.

At such a site (BERT, RoBERTa, DistilBERT) the general path (``bottleneck_compose``) computes

    s = h + x;  a = LN(s);  r = relu(a Wd^T + bd);  u = (r Wu^T + bu) * scaling;  y = LN((u + h) + x)

and autograd keeps, per site, ``s`` (for the owner's ``LN(s)``), the adapter input ``a``, the
bottleneck activation, LN2's input and their statistics. ``SerialSite`` keeps only ``s``, ``r`` and
LN2's statistics, what the frozen model keeps at the site plus one bottleneck-wide tensor, and
recomputes in backward the rest it needs: LN2's input (the up-projection and a sum) and ``a`` with
LN1's statistics. In forward ``a`` is the owner's output (``LN(h + x)`` as the model computed it),
passed in detached so that the owner's graph, and its copy of ``s``, is freed.

The forward runs the general path's operations in its order, so its outputs are the same bits. The
backward recomputes LN2's input as ``u + s`` (the sum reassociated), so gradients agree to rounding.
Over a half-precision base the adapter is fp32 (``layer.adapter_dtype``): as on the general path, the
bottleneck and the adapter's residual sum are computed in fp32, the site's sum and layer norms in the base's dtype.
Where any condition of ``fused_site`` fails, the caller takes the general path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from ..sites import Norm
from .bottleneck_block import BottleneckBlock

ENABLED = True
"""False: every site takes the general path (tests compare the two paths; a double backward, which
this Function's backward does not support, needs it)."""

_aten = torch.ops.aten


class SerialSite(torch.autograd.Function):
    """``LN((relu(a Wd^T + bd) Wu^T + bu) * scaling + h + x)`` with ``a = LN(h + x)``; the layer norm's
    weight and bias are frozen (no gradient), ``a`` gets none (it is recomputed from ``h + x``)."""

    @staticmethod
    def forward(ctx: FunctionCtx, h: Tensor, x: Tensor, a: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float, wd: Tensor, bd: Tensor, wu: Tensor, bu: Tensor, scaling: float) -> Tensor:
        width = h.shape[-1]
        r = F.relu(F.linear(a.to(wd.dtype), wd, bd))  # fp32 adapter over a half-precision base: computed in fp32
        u = F.linear(r, wu, bu)
        u = u.mul_(scaling) if scaling != 1.0 else u
        z = u.add_(h.to(u.dtype)).to(h.dtype).add_(x)  # the general order: the block's sum in its dtype, back, + x
        y, mean, rstd = _aten.native_layer_norm(z, [width], weight, bias, eps)
        ctx.save_for_backward(h + x, r, mean, rstd, weight, bias, wd, wu, bu)  # type: ignore[arg-type]  # None: no affine
        ctx.eps, ctx.scaling = eps, scaling  # type: ignore[attr-defined]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        s, r, mean, rstd, weight, bias, wd, wu, bu = ctx.saved_tensors  # type: ignore[attr-defined]
        need: tuple[bool, ...] = ctx.needs_input_grad  # type: ignore[attr-defined]
        scaling: float = ctx.scaling  # type: ignore[attr-defined]
        width, mask = s.shape[-1], [True, False, False]
        u = F.linear(r, wu, bu)
        z = (u.mul_(scaling) if scaling != 1.0 else u).add_(s).to(s.dtype)  # LN2's input again
        gz = _aten.native_layer_norm_backward(grad.contiguous(), z, [width], mean, rstd, weight, bias, mask)[0]
        del u, z
        gu = (gz.to(wu.dtype) * scaling if scaling != 1.0 else gz.to(wu.dtype)).reshape(-1, width)
        r2 = r.reshape(-1, r.shape[-1])
        gwu = gu.t().mm(r2) if need[8] else None
        gbu = gu.sum(0) if need[9] else None
        gr = _aten.threshold_backward(gu.mm(wu), r2, 0)  # relu's own backward: zero where it output zero
        gwd = gbd = gs = None
        if need[6] or need[0] or need[1]:
            a, mean1, rstd1 = _aten.native_layer_norm(s, [width], weight, bias, ctx.eps)  # type: ignore[attr-defined]
            gwd = gr.t().mm(a.reshape(-1, width).to(gr.dtype)) if need[6] else None
            del a
            if need[0] or need[1]:
                ga = gr.mm(wd).view(s.shape).to(s.dtype)
                gs = _aten.native_layer_norm_backward(ga, s, [width], mean1, rstd1, weight, bias, mask)[0].add_(gz)
        gbd = gr.sum(0) if need[7] else None
        return (gs if need[0] else None, gs if need[1] else None, None, None, None, None, gwd, gbd, gwu, gbu, None)


def _plain_layer_norm(norm: Norm | None) -> nn.LayerNorm | None:
    """The site norm's module when it is ``nn.LayerNorm.forward`` of a 1-d LayerNorm (else None)."""
    module = getattr(norm, "__self__", None)
    if getattr(norm, "__func__", None) is nn.LayerNorm.forward and isinstance(module, nn.LayerNorm):
        return module if len(module.normalized_shape) == 1 else None
    return None


def _eligible(block: BottleneckBlock) -> bool:
    """Pfeiffer's placement and a block whose every step ``SerialSite`` computes: serial, the site's norm
    before and after, residual ``h``, no adapter norms or gate, a number as scaling, relu, no dropout."""
    return (not block.is_parallel and block.original_ln_before and block.residual_before_ln is True
            and block.original_ln_after and block.norm_before is None and block.norm_after is None
            and block.gate is None and isinstance(block.scaling, float) and block.non_linearity == "relu"
            and (block.dropout.p == 0 or not block.training))


def fused_site(block: BottleneckBlock, h: Tensor, x: Tensor, norm: Norm | None, own: Tensor | None) -> Tensor | None:
    """The site's output through ``SerialSite`` (``own``: the model's ``LN(h + x)``), or None where the
    general path must run: fusion off, not such a site or block, a trainable site norm, autocast or
    mixed dtypes other than an adapter in one dtype (fp32) over a base in another, or nothing to
    differentiate (the general path, reusing ``own``, is as lean without autograd)."""
    ln = _plain_layer_norm(norm)
    if not ENABLED or own is None or ln is None or not _eligible(block) or not torch.is_grad_enabled():
        return None
    params = (block.down.weight, block.down.bias, block.up.weight, block.up.bias)
    frozen = [t for t in (ln.weight, ln.bias) if t is not None]
    if any(t.requires_grad for t in frozen) or not any(t.requires_grad for t in (h, x, *params)):
        return None
    if torch.is_autocast_enabled(h.device.type) or len({t.dtype for t in (h, x, own, *frozen)}) != 1:
        return None
    if len({t.dtype for t in params}) != 1:
        return None
    if h.shape != x.shape or own.shape != h.shape or ln.normalized_shape[0] != h.shape[-1]:
        return None
    assert isinstance(block.scaling, float)
    out: Tensor = SerialSite.apply(h, x, own.detach(), ln.weight, ln.bias, ln.eps, *params, block.scaling)
    return out
