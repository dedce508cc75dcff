"""LoRA on a parameter in hot-swapping (``dt.hotswap``): per-expert rank slots and a scale held in a tensor.

``ParameterLoraDelta`` inherits ``ParamRankSlot``, which gives it ``hotswap``'s two capabilities, as
``lora_slot.RankSlot`` gives a layer's LoRA:

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

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bases import ParameterBase
from ..config import DeltaConfig
from ..errors import AdapterFileError
from ..layer import WeightDelta
from .lora_slot import RANK_FIELDS, SCALE_FIELDS, _settings, hold_scaling_in_tensor, scale_for


class ParamRankSlot(WeightDelta):
    """The hot-swap side of per-expert factors ``A: (r·E, in)``, ``B: (out, r·E)``."""

    A: nn.Parameter
    B: nn.Parameter
    base: ParameterBase
    r: int
    """The rank the factors have room for per expert (the slot's)."""
    scaling: float
    """A Python float, or after ``hold_settings_in_tensors`` a 0-dim tensor buffer standing for it."""
    true_rank: int | None = None
    """The adapter's rank when the factors hold more (zero) ranks than it; None: all of them."""

    def _resized(self, a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """``a``, ``b`` (peft's layout) cut or zero-padded to ``rank`` per expert."""
        experts, have = self.base.num_experts, a.shape[0] // self.base.num_experts
        a3, b3 = a.reshape(experts, have, a.shape[-1]), b.reshape(b.shape[0], have, experts)
        extra = rank - have
        a3 = F.pad(a3, (0, 0, 0, extra)) if extra > 0 else a3[:, :rank]
        b3 = F.pad(b3, (0, 0, 0, extra)) if extra > 0 else b3[:, :rank]
        return a3.reshape(experts * rank, a.shape[-1]), b3.reshape(b.shape[0], rank * experts)

    def tensors_to_save(self) -> dict[str, Tensor]:
        """The factors at the adapter's own rank: a padded slot saves the adapter it holds."""
        rank = self.true_rank
        if rank is None or rank == self.r:
            return self.tensors()
        a, b = self._resized(self.A, self.B, rank)
        return {"lora_A.weight": a, "lora_B.weight": b}

    def slot_rank(self) -> int:
        return self.r

    @torch.no_grad()
    def pad_rank(self, target: int) -> None:
        if target <= self.r:
            return
        self.true_rank = self.r if self.true_rank is None else self.true_rank
        a, b = self._resized(self.A, self.B, target)
        self.A = nn.Parameter(a, requires_grad=self.A.requires_grad)
        self.B = nn.Parameter(b, requires_grad=self.B.requires_grad)
        self.r = target

    def fit_rank(self, values: Mapping[str, Tensor], config: DeltaConfig, key: str, where: str) -> dict[str, Tensor]:
        out = dict(values)
        a, b = values.get("lora_A.weight"), values.get("lora_B.weight")
        if a is None or b is None or not self._are_factors(a, b):
            return out  # not this parameter's factors at any rank: the shape check reports them
        rank = a.shape[0] // self.base.num_experts
        expected = _settings(config).rank_and_alpha(self.base.path)[0]
        if rank != expected:
            raise AdapterFileError(f"{where}: the factors have rank {rank} per expert but the folder's config gives "
                                   f"{self.base.path} rank {expected} (r, rank_pattern): the folder is inconsistent. "
                                   "The model was left unchanged.")
        if rank > self.r:
            raise AdapterFileError(
                f"{where}: the adapter has rank {rank} per expert on {self.base.describe()} but the slot has room for "
                f"rank {self.r}. Fix: after loading the first adapter and before compiling, call "
                f"dt.prepare_hotswap(model, target_rank={rank}) or larger. The model was left unchanged.")
        out["lora_A.weight"], out["lora_B.weight"] = self._resized(a, b, self.r)
        return out

    def _are_factors(self, a: Tensor, b: Tensor) -> bool:
        """Whether ``a`` and ``b`` are this parameter's factors at some rank (only the rank axis may differ)."""
        experts = self.base.num_experts
        return (a.dim() == 2 and b.dim() == 2 and a.shape[1] == self.A.shape[1] and b.shape[0] == self.B.shape[0]
                and a.shape[0] == b.shape[1] and a.shape[0] > 0 and a.shape[0] % experts == 0)

    def retunable_fields(self, slot: DeltaConfig, new: DeltaConfig) -> frozenset[str]:
        return RANK_FIELDS | SCALE_FIELDS | {"init_lora_weights"}

    def hold_settings_in_tensors(self) -> None:
        hold_scaling_in_tensor(self, self.A)

    def retune(self, config: DeltaConfig, key: str) -> None:
        settings = _settings(config)
        rank, alpha = settings.rank_and_alpha(self.base.path)
        scale = scale_for(rank, alpha, settings.use_rslora)
        if isinstance(self.scaling, Tensor):
            self.scaling.fill_(scale)
        else:
            self.scaling = scale
        self.true_rank = None if rank == self.r else rank


if TYPE_CHECKING:  # the class declares hotswap's capabilities; mypy checks the signatures here
    from ..hotswap import PaddedRank, Retunable

    def _declares(slot: ParamRankSlot) -> tuple[PaddedRank, Retunable]:
        return slot, slot
