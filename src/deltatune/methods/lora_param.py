"""LoRA on a parameter (peft's ``target_parameters``): one rank-r pair per expert of a 3-D expert stack.

Mixture-of-experts blocks (Mixtral, Qwen2/3-MoE, OLMoE in transformers 5) keep every expert's
weight in one ``(experts, out, in)`` parameter. Expert ``e`` gets its own
``ΔW_e = s · B_e A_e`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``r`` per expert.

peft's layout (``lora.ParamWrapper``, peft 0.21), kept so files load both ways: ``lora_A.weight``
is ``(r·E, in)`` and expert ``e`` owns its rows ``e·r … e·r + r - 1``; ``lora_B.weight`` is
``(out, r·E)`` and expert ``e`` owns the columns ``e, E + e, 2E + e, …`` (column ``j·E + e`` is
its ``j``-th). A 2-D parameter is one expert: ``ΔW = s · B A``. Parameters: ``r·E·(in + out)``.

In forward the module runs with ``W + ΔW`` in the parameter's place (``param_site``); one
adapter folds its factors into W with one ``baddbmm`` (as peft does, so outputs match peft's
bit for bit in fp32), several add their ``ΔW`` in W's dtype. Init as LoRA on a linear layer:
True = A Kaiming-uniform, B zero; "gaussian" = A normal with std 1/r, B zero; False = both
Kaiming-uniform (nn.Linear's default, which peft leaves in place). Hot-swap (rank slots, a scale held
in a tensor): ``lora_param_slot``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..bases import BaseLayer, ParameterBase
from ..errors import AdapterError, TargetError
from .lora import KINDS
from .lora_config import LoraConfig
from .lora_param_slot import ParamRankSlot
from .lora_slot import scale_for


class ParameterLoraDelta(ParamRankSlot):
    """Per-expert LoRA factors for one parameter, in peft's shapes."""

    def __init__(self, base: ParameterBase, r: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = scaling
        experts, device = base.num_experts, base.weight.device
        self.A = nn.Parameter(torch.empty(r * experts, base.in_features, device=device))
        self.B = nn.Parameter(torch.empty(base.out_features, r * experts, device=device))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        raise AdapterError(f"a LoRA on {self.base.describe()} changes the parameter the module computes with; "
                           "it has no output change of its own (its ParameterLayer substitutes W + ΔW)")

    def tensors(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.A, "lora_B.weight": self.B}

    def _per_expert(self) -> tuple[Tensor, Tensor]:
        """``B_e`` as ``(E, out, r)`` and ``A_e`` as ``(E, r, in)`` (views; peft's row and column split)."""
        experts = self.base.num_experts
        a = self.A.reshape(experts, self.r, self.A.shape[-1])
        b = self.B.reshape(self.B.shape[0], self.r, experts).permute(2, 0, 1)
        return b, a

    def expert_factors(self) -> tuple[Tensor, Tensor, float]:
        """``(B_e, A_e, s)`` per expert at the adapter's rank, views of the live factors
        (``combine_layer.ExpertFactors``: adapter arithmetic combines expert by expert and fills a result
        through these views)."""
        b, a = self._per_expert()
        rank = self.adapter_rank()  # a padded slot's zero ranks are no part of the adapter
        return b[..., :rank], a[:, :rank], float(self.scaling)

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``ΔW`` in fp32 in the stored layout, computed as peft computes it (einsum over the split factors)."""
        if self.base.weight.dim() == 2:
            return (self.B.float() @ self.A.float()) * self.scaling
        experts = self.base.num_experts
        b = self.B.float().reshape(self.B.shape[0], self.r, experts)
        a = self.A.float().reshape(experts, self.r, self.A.shape[-1])
        return torch.einsum("ore,eri->eio" if self.base.transposed else "ore,eri->eoi", b, a) * self.scaling

    def merge(self, weight: Tensor) -> Tensor:
        """``W + ΔW`` in W's dtype; an expert stack folds the factors in with one ``baddbmm``."""
        if weight.dim() != 3 or self.base.num_experts == 1 or weight.dtype.itemsize < 2:
            return weight + self.delta_weight(weight).to(weight)
        b, a = self._per_expert()
        lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if self.base.transposed else (b, a)
        scale = self.scaling
        if isinstance(scale, Tensor):  # held for hot-swaps: a value compiled code reads, not a constant
            lhs, scale = lhs * scale, 1.0
        with torch.autocast(device_type=weight.device.type, enabled=False):  # the fold stays in W's dtype
            return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=scale)

    @torch.no_grad()
    def initialize(self, init: bool | str) -> None:
        """Fill A and B per ``init_lora_weights`` (see the module docstring)."""
        if init == "gaussian":
            nn.init.normal_(self.A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.B)


def make_parameter_lora(base: BaseLayer, config: LoraConfig) -> ParameterLoraDelta:
    """The delta for a parameter site; rank and alpha patterns match the parameter's full name, as in peft."""
    assert isinstance(base, ParameterBase)
    if config.use_qalora:  # else the flag would be dropped silently while the file keeps it
        raise TargetError(f"use_qalora=True cannot apply to {base.describe()}: QA-LoRA pools a layer's input, and a "
                          "parameter has no input of its own. Fix: adapt the parameters in an adapter without "
                          "use_qalora, or drop them from target_parameters")
    r, alpha = config.rank_and_alpha(base.path)
    delta = ParameterLoraDelta(base, r, scale_for(r, alpha, config.use_rslora))
    delta.initialize(config.init_lora_weights)
    return delta


KINDS[ParameterBase.kind] = make_parameter_lora
