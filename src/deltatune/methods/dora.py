"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed
Low-Rank Adaptation"), switched on with ``LoraConfig(use_dora=True)`` as in peft.

Update: the adapted weight is split into a trained magnitude ``m`` (one entry per output) and a
direction given by LoRA: ``W' = m * (W + s * B @ A) / ||W + s * B @ A||``, the norm taken per
output over every other axis of the canonical ``(out, in, *kernel)`` layout (peft's
"column-wise" norm: over ``in`` for Linear and GPT-2 ``Conv1D``, over the vocabulary for an
embedding, over ``in * kernel`` for Conv1d/2d/3d). In forward the dense ``W'`` is never used:
with ``g = m / ||W + s B A||`` computed once per call and detached (section 4.3 of the paper:
the norm is treated as a constant in backward), the output is

    y + (g - 1) * (y - bias) + g * s * B (A x)    ==    g * (W x + s B A x) + bias,

exactly peft's formula (with dropout active in training, ``W x`` is recomputed on the dropped
input, as peft does).

Init: A and B as LoRA's ``init_lora_weights``; then ``m = ||W + s * B @ A||`` (so with B = 0,
``m = ||W||`` and the adapter starts as the identity). Parameter count per layer: LoRA's
``r * (in * prod(kernel) + out)`` plus ``out``. ``m`` is saved under peft's key
``lora_magnitude_vector`` with peft's shape: ``(out,)``, or ``(1, out, 1, ...)`` for conv.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from .lora import VARIANTS, LoraDelta


class DoraDelta(LoraDelta):
    """LoRA's A and B plus a magnitude per output; see the module docstring for the formula."""

    def __init__(self, base: BaseLayer, r: int, scaling: float, dropout: float) -> None:
        super().__init__(base, r, scaling, dropout)
        kernel = base.kernel_size
        shape = (1, base.out_features, *(1,) * len(kernel)) if kernel else (base.out_features,)
        self.magnitude = nn.Parameter(torch.empty(shape, device=base.weight.device))

    def _per_output(self, t: Tensor) -> Tensor:
        """A per-output vector shaped to broadcast over the layer output (channels are dim 1 for conv)."""
        return t.view(-1, *(1,) * len(self.base.kernel_size))

    @torch.no_grad()
    def weight_norm(self, weight: Tensor | None = None) -> Tensor:
        """``||W + s B A||`` per output, in the adapter dtype, without autograd (DoRA detaches it)."""
        a, b = self.A.flatten(1), self.B.flatten(1)
        w = (self.base.read_weight() if weight is None else weight).to(a.dtype).flatten(1)
        if isinstance(self.scaling, Tensor):  # a scale held for hot-swaps (lora_slot): addmm takes only numbers
            return torch.linalg.vector_norm(w + (b @ a) * self.scaling, dim=1)
        return torch.linalg.vector_norm(torch.addmm(w, b, a, alpha=self.scaling), dim=1)

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """``m = ||W + s B A||`` for the base weight as it will be once attached."""
        weight = self.base.read_weight().float()
        # PiSSA / OLoRA: the residual plus s B A is W itself
        took = self._residual is not None
        norm = torch.linalg.vector_norm(weight.flatten(1), dim=1) if took else self.weight_norm(weight)
        self.magnitude.copy_(norm.view(self.magnitude.shape))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        g = self.magnitude.flatten() / self.weight_norm()
        out = y.to(g.dtype)
        bias = self.base.bias if x.is_floating_point() else None  # embeddings have no bias
        if x.is_floating_point():
            x = x.to(self.A.dtype)
        if self.training and x.is_floating_point() and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)  # peft: the base part then runs on the dropped input too
            base_part = self.base.project(x, self.base.read_weight().to(x.dtype))
            out = out + self._per_output(g - 1) * base_part
        elif bias is None:
            out = out * self._per_output(g)  # g * (W x)
        else:  # g * (y - b) + b == g * y + (1 - g) * b: one full-size tensor instead of three
            out = torch.addcmul(self._per_output((1 - g) * bias.to(g)), out, self._per_output(g))
        scaled_b = g.view(-1, *(1,) * (self.B.dim() - 1)) * self.B
        return self.base.expand(out, self.base.project(x, self.A), scaled_b, self.scaling).to(y.dtype)

    depends_on_weight = True  # ΔW = m (W + s B A) / ||W + s B A|| - W

    def _factor(self, norm: Tensor, weight: Tensor) -> Tensor:
        """``m / norm`` shaped to scale the rows of a canonical ``(out, in, *kernel)`` weight."""
        return (self.magnitude.detach().float().flatten() / norm).view(-1, *(1,) * (weight.dim() - 1))

    def contribution(self, x: Tensor, y: Tensor) -> Tensor:
        return self(x, y) - y  # the rescaling touches the base output too, not only the low-rank part

    def merge(self, weight: Tensor) -> Tensor:
        """``m (W + s B A) / ||W + s B A||`` (the norm per output) for the fp32 base weight ``W``."""
        return self._factor(self.merge_state(weight), weight) * (weight + self.low_rank_weight())

    def merge_state(self, weight: Tensor) -> Tensor:
        """``||W + s B A||`` per output: the merged weight alone does not tell it."""
        return self.weight_norm(weight).float()

    def inverse(self, merged: Tensor, state: Tensor | None) -> Tensor:
        assert state is not None
        return merged / self._factor(state, merged) - self.low_rank_weight()

    def delta_weight(self, weight: Tensor) -> Tensor:
        return self.merge(weight) - weight

    def tensors(self) -> dict[str, Tensor]:
        return {**super().tensors(), "lora_magnitude_vector": self.magnitude}


def make_dora(base: BaseLayer, r: int, scaling: float, dropout: float, init: bool | str) -> DoraDelta:
    delta = DoraDelta(base, r, scaling, dropout)
    delta.initialize(init)
    delta.init_magnitude()
    return delta


VARIANTS["use_dora"] = make_dora
