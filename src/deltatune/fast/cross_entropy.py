"""The output projection and the token cross-entropy in one pass over row chunks.

A causal LM's loss needs ``logits = h Wᵀ`` over the whole vocabulary: with 32k tokens of
vocabulary and 1k tokens of batch that is 128 MB of fp32 logits, then as much again for
``log_softmax`` and for its gradient, each written and read several times. Here the rows are
taken a chunk at a time: the chunk's logits become its softmax in place, the loss is read off,
and the gradient with respect to ``h`` (``(softmax - onehot) W / n``) is computed right away,
so backward only scales a saved ``(tokens, hidden)`` tensor. The matrix products are the same
as the stock path's; what goes is the full-size logits and the passes over them.

The loss equals ``F.cross_entropy(logits.float(), labels, ignore_index=-100)`` (mean over the
labelled tokens, or the sum divided by ``divisor``) within fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25
"""Logits held at once (128 MB in fp32): 1048 rows of a 32k vocabulary, 262 of a 128k one.
Smaller chunks make the output projection slower on CPU (measured on the benchmark LLaMA: a
step with 131-row chunks gained 1% over the stock loss, with 512 rows 6%, unchunked 9%)."""


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="sum") / divisor``.

    ``hidden`` is ``(tokens, hidden)``, ``labels`` ``(tokens,)`` with ``IGNORE_INDEX`` for rows
    that carry no loss. Gradients for ``weight`` and ``bias`` are computed only when they are
    trained (an untied, trainable output head).
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                divisor: float) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _Grads(hidden, weight, bias, need_h, need_w, need_b and bias is not None)
        total = torch.zeros((), dtype=_upcast(hidden).dtype, device=hidden.device)
        rows = chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, target = hidden[start:start + rows], labels[start:start + rows]
            probs, loss = _softmax_and_loss(_upcast(F.linear(h, weight, bias)), target,
                                            _rows_of(h, weight, bias))
            total += loss
            if grads.any:
                grads.add_chunk(start, h, _minus_onehot(probs, target))
        ctx.save_for_backward(*grads.saved(1.0 / divisor))
        ctx.which = (grads.need_h, grads.need_w, grads.need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        h, w, b = ((next(saved) * grad).to(dtype) if need else None for need, dtype in zip(ctx.which, ctx.dtypes))
        return h, w, b, None, None


def _rows_of(h: Tensor, weight: Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """A function giving the (upcast) logits of some of the rows of ``h``."""
    return lambda rows: _upcast(F.linear(h[rows], weight, bias))


def _upcast(t: Tensor) -> Tensor:
    """Half-precision values in fp32 (as transformers computes the loss); fp32 and fp64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _softmax_and_loss(logits: Tensor, target: Tensor,
                      exact_logits: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The softmax of ``logits`` (computed in place) and the summed loss of the labelled rows.

    The softmax is ATen's own kernel writing over its input (row by row it reads a row before it
    writes it, so the aliasing is safe): one pass over memory instead of the five of max, subtract,
    exp, sum and divide (7 vs 19-23 ms for 1024 x 32000 fp32 here). A row's loss is then
    ``-log p[target]``, as precise as ``lse - logit[target]`` while ``p[target]`` is a normal
    float. Where it is not (a loss above about 87 in fp32: the probability underflowed), the
    row's logits are computed again by ``exact_logits(rows)`` and its loss from them; the common
    case needs no pass over the logits beyond the softmax.
    """
    labelled = target != IGNORE_INDEX
    index = target.clamp(min=0)[:, None]
    probs = torch.ops.aten._softmax.out(logits, 1, False, out=logits)
    picked = probs.gather(1, index).squeeze(1)
    loss = -picked.log()
    lost = labelled & (picked < torch.finfo(picked.dtype).tiny)
    if bool(lost.any()):
        rows = lost.nonzero().squeeze(1)
        again = exact_logits(rows)
        loss[rows] = torch.logsumexp(again, 1) - again.gather(1, index[rows]).squeeze(1)
    return probs, torch.where(labelled, loss, 0.0).sum()


def _minus_onehot(probs: Tensor, target: Tensor) -> Tensor:
    """``softmax - onehot(target)`` in place; rows without a label get zero gradient."""
    labelled = target != IGNORE_INDEX
    probs.scatter_add_(1, target.clamp(min=0)[:, None], -labelled[:, None].to(probs.dtype))
    if not bool(labelled.all()):
        probs.mul_(labelled[:, None])
    return probs


class _Grads:
    """The gradients accumulated chunk by chunk, unscaled until ``saved``."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, need_h: bool, need_w: bool,
                 need_b: bool) -> None:
        self.need_h, self.need_w, self.need_b = need_h, need_w, need_b
        self.any = need_h or need_w or need_b
        self.weight = weight
        self.h = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device) if need_h else None
        wide = torch.promote_types(weight.dtype, torch.float32)
        self.w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        self.b = torch.zeros(weight.shape[0], dtype=wide, device=weight.device) if need_b else None

    def add_chunk(self, start: int, h: Tensor, d_logits: Tensor) -> None:
        """Add one chunk's share, given the chunk's rows and ``d loss / d logits``."""
        if self.h is not None:  # the chunk's rows of the hidden gradient, written where they belong
            torch.mm(d_logits.to(self.weight.dtype), self.weight, out=self.h[start:start + h.shape[0]])
        if self.w is not None:
            self.w.addmm_(d_logits.t(), h.to(self.w.dtype))
        if self.b is not None:
            self.b += d_logits.sum(0)

    def saved(self, scale: float) -> list[Tensor]:
        return [t.mul_(scale) for t in (self.h, self.w, self.b) if t is not None]
