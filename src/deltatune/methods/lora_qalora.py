"""QA-LoRA: quantization-aware low-rank adaptation (Xu et al. 2023, "QA-LoRA: Quantization-Aware
Low-Rank Adaptation of Large Language Models"), switched on with ``LoraConfig(use_qalora=True,
qalora_group_size=G)`` as in peft.

The input is averaged over each group of ``G`` consecutive features before ``lora_A``, so
``A: (r, in / G)``. peft's forward multiplies the pooled input by the number of groups
``in / G``; keeping its formula (and its saved tensors) gives

    y + s * B (A (n * pool_G(x))),     n = in / G,
    ΔW[o, i] = s * (n / G) * (B A)[o, i // G],

a change that is constant within every group of ``G`` inputs. On an ``int4_group`` base with
the same group size (or a divisor of ``G``) it folds into the per-group offsets, so
``dt.unload(merge=True, requantize=True)`` gives a 4-bit model computing what was trained
(``quant/int4_linear.py``). Parameter count per layer: ``r * (in / G + out)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from ..errors import ConfigError, TargetError
from ..quant.config import INT4_GROUP
from ..registry import MethodOption, Recipe, RecipeInput, register_recipe
from .lora import CONFIGURED_VARIANTS, LoraDelta, lora_fields, lora_param_groups
from .lora_config import LoraConfig


class QALoraDelta(LoraDelta):
    """LoRA whose ``lora_A`` reads the input averaged per group of ``group_size`` features."""

    def __init__(self, base: BaseLayer, r: int, scaling: float, dropout: float, group_size: int) -> None:
        super().__init__(base, r, scaling, dropout)
        self.group_size = group_size
        self.groups = base.in_features // group_size
        self.A = nn.Parameter(torch.empty(r, self.groups, device=self.A.device))  # replaces LoRA's (r, in)

    def _hidden(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            x = self.dropout(x).to(self.A.dtype)
        pooled = x.unflatten(-1, (self.groups, self.group_size)).mean(dim=-1) * self.groups  # peft's pooling
        return self.base.project(pooled, self.A)

    def low_rank_weight(self) -> Tensor:
        """``ΔW`` in ``(out, in)``, fp32: each group's column of ``s * (n / G) * B A`` repeated ``G`` times."""
        product = self.B.float().flatten(1) @ self.A.float()
        grouped = product * (self.scaling * self.groups / self.group_size)
        return grouped.repeat_interleave(self.group_size, dim=1)


def make_qalora(base: BaseLayer, config: LoraConfig, r: int, scaling: float) -> QALoraDelta:
    group_size = config.qalora_group_size
    if base.kind != "linear" or base.in_features % group_size:
        raise TargetError(
            f"use_qalora=True needs a linear layer whose input size divides into groups of qalora_group_size="
            f"{group_size}; {base.describe()} does not. Fix: choose a group size dividing every targeted layer's "
            "input size (the base's quantization group size), or leave this layer out of target_modules")
    delta = QALoraDelta(base, r, scaling, config.lora_dropout, group_size)
    delta.initialize(config.init_lora_weights)
    return delta


CONFIGURED_VARIANTS["use_qalora"] = make_qalora


def build_qalora(run: RecipeInput) -> LoraConfig:
    """``--method qalora``: the base must be stored as int4_group, in groups that each lie inside one
    pooled group (``--qalora-group-size`` a multiple of ``--quant-group-size``), or the merge is lossy."""
    quantize, base_group = run.run_options.get("quantize", "none"), run.run_options.get("quant_group_size", 0)
    if quantize != INT4_GROUP:
        raise ConfigError("options", "quantize", quantize, "QA-LoRA trains over a base stored as int4_group (its "
                          "4-bit merge is lossless only there)", "pass --quantize int4_group --quant-group-size G "
                          "(G dividing every quantized layer's input size, e.g. 32 or 64)")
    group = run.options["qalora_group_size"] or base_group
    if group < 1 or group % base_group:
        raise ConfigError("options", "qalora_group_size", group, f"must be a multiple of --quant-group-size "
                          f"{base_group}, so that each of the base's groups lies in one pooled group (else the "
                          "merge into the 4-bit base is lossy)", f"pass 0 (= {base_group}) or a multiple of it")
    return LoraConfig(use_qalora=True, qalora_group_size=group, **lora_fields(run))


register_recipe(Recipe(
    "qalora", "QA-LoRA (Xu et al. 2023): LoRA over the input averaged per group, on an int4_group base "
    "(--quantize int4_group); merges into the 4-bit base losslessly", build_qalora,
    options=(MethodOption("qalora_group_size", "int", 0, "QA-LoRA: inputs averaged per group before lora_A; 0 = "
                          "--quant-group-size (a multiple of it keeps the 4-bit merge lossless)"),),
    param_groups=lora_param_groups))
