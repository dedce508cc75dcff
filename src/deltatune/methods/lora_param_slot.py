"""LoRA on a parameter in hot-swapping (``dt.hotswap``): per-expert rank slots and a scale held in a tensor.

``ParameterLoraDelta`` inherits ``ParamRankSlot``, which gives it ``hotswap``'s two capabilities, as
``lora_slot.RankSlot`` gives a layer's LoRA (both share ``lora_slot.FactorSlot``'s checks, padding,
saving and retuning; this class says where each expert's ranks are):

- ``PaddedRank``: expert ``e``'s rank axis is A's rows ``e·r …`` and B's columns ``j·E + e`` (peft's
  layout, ``lora_param``), so giving every expert zero rows of A and zero columns of B up to rank R
  keeps every ``ΔW_e``. A slot of rank R then takes an adapter of any rank r <= R (each expert's
  factors first, zeros after); the adapter's own rank is kept (``true_rank``), so a save writes
  rank-r factors in peft's layout.
- ``Retunable``: the scale may differ in a swap (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), as
  may the rank (``r``, ``rank_pattern``) and ``init_lora_weights`` (it acts only at creation; every init a
  parameter accepts leaves the base alone). ``lora_dropout`` is 0 on a parameter (its config refuses
  more). After ``hold_settings_in_tensors`` the scale is a 0-dim buffer, so a new value does not make
  compiled code recompile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bases import ParameterBase
from ..layer import WeightDelta
from .lora_slot import FactorSlot


class ParamRankSlot(FactorSlot, WeightDelta):
    """The hot-swap side of per-expert factors ``A: (r·E, in)``, ``B: (out, r·E)``."""

    base: ParameterBase
    r: int
    """The rank the factors have room for per expert (the slot's)."""

    def slot_rank(self) -> int:
        return self.r

    def _resized(self, a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """``a``, ``b`` (peft's layout) cut or zero-padded to ``rank`` per expert (a copy when cut: the
        experts interleave in B)."""
        experts, have = self.base.num_experts, a.shape[0] // self.base.num_experts
        a3, b3 = a.reshape(experts, have, a.shape[-1]), b.reshape(b.shape[0], have, experts)
        extra = rank - have
        a3 = F.pad(a3, (0, 0, 0, extra)) if extra > 0 else a3[:, :rank]
        b3 = F.pad(b3, (0, 0, 0, extra)) if extra > 0 else b3[:, :rank]
        return a3.reshape(experts * rank, a.shape[-1]), b3.reshape(b.shape[0], rank * experts)

    @torch.no_grad()
    def pad_rank(self, target: int) -> None:
        super().pad_rank(target)
        self.r = max(self.r, target)  # the factors' new room per expert

    def _rank_of(self, a: Tensor) -> int:
        return a.shape[0] // self.base.num_experts

    def _are_factors(self, a: Tensor, b: Tensor) -> bool:
        experts = self.base.num_experts
        return (a.dim() == 2 and b.dim() == 2 and a.shape[1] == self.A.shape[1] and b.shape[0] == self.B.shape[0]
                and a.shape[0] == b.shape[1] and a.shape[0] > 0 and a.shape[0] % experts == 0)

    def _rank_key(self, key: str) -> str:
        return self.base.path  # patterns match the parameter's full name, as in peft

    def _rank_mismatch(self, rank: int, expected: int) -> str:
        return (f"the factors have rank {rank} per expert but the folder's config gives {self.base.path} "
                f"rank {expected}")

    def _no_room(self, rank: int, a: Tensor, b: Tensor) -> str:
        return (f"the adapter has rank {rank} per expert on {self.base.describe()} but the slot has room for "
                f"rank {self.r}")
