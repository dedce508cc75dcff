"""AdaLoRA: adaptive budget allocation (Zhang et al. 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning").

Update: an SVD-shaped ``W' = W + s / (n + 1e-5) * P Λ Q`` with ``Q = lora_A: (r, in * prod(kernel))``,
``Λ = lora_E: (r, 1)``, ``P = lora_B: (out, r)``, ``s = lora_alpha`` and ``n = ranknum = init_r``
(peft keeps n at init_r also after a rank cut). Init: Λ = 0 (the identity), P and Q normal
with std 0.02. Parameter count per layer: ``r * (in * prod(kernel) + out + 1)``.

Training adds ``AdaLoraScheduler.orth_loss()`` (``orth_reg_weight`` times the mean of
``||Q Qᵀ - I||_F`` and ``||Pᵀ P - I||_F``) to the loss and calls ``scheduler.step(global_step)``
after ``backward`` and before ``zero_grad``: the sensitivity ``|p * grad|`` of every entry is
smoothed (EMA ``beta1``) and its uncertainty tracked (EMA ``beta2``); a triplet's score is its
Λ score plus the mean scores of its Q row and P column; every ``deltaT`` steps the lowest-scored
triplets are masked (Λ set to 0) down to a budget that falls cubically from ``init_r * n`` after
``tinit`` steps to ``target_r * n`` at ``total_step - tfinal``, after which the mask is fixed.
The mask goes into ``rank_pattern`` (module path + ``.lora_E`` -> kept flags), and a save drops
the masked triplets from the file, as peft does; loading with a rank_pattern builds the cut ranks.
Like peft: Linear, GPT-2 Conv1D and Conv2d layers; ``target_modules`` must be given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig
from ..values import is_int
from ..errors import TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, last_fan_in_fan_out, register
from .lora import LoraConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings, with peft's field names and defaults; ``total_step`` is required."""

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: Mapping[str, Any] | None = None  # type: ignore[assignment]

    def validate(self) -> None:
        super().validate()
        for field in ("target_r", "init_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, field)
            self.check(is_int(value) and value >= (1 if "r" in field else 0),
                       field, "it must be a non-negative integer (a positive one for ranks and deltaT)", "pass e.g. 8")
        self.check(isinstance(self.total_step, int) and self.total_step > 0, "total_step", "the budget schedule needs "
                   "the number of training steps", "pass total_step=<steps you will train>")
        self.check(self.tinit < (self.total_step or 0) - self.tfinal, "tinit", "the schedule leaves no budgeting phase",
                   f"make tinit + tfinal smaller than total_step={self.total_step}")
        for field in ("beta1", "beta2"):
            self.check(isinstance(getattr(self, field), float) and 0 < getattr(self, field) < 1, field,
                       "an EMA factor must be in (0, 1)", "pass e.g. 0.85")
        self.check(isinstance(self.orth_reg_weight, (int, float)) and self.orth_reg_weight >= 0, "orth_reg_weight",
                   "the regularization weight must be >= 0", "pass e.g. 0.5")
        for field, off in (("r", 8), ("use_dora", False), ("use_rslora", False), ("alpha_pattern", {}),
                           ("target_parameters", None)):
            self.check(getattr(self, field) == off, field, "peft's AdaLoRA ignores it", f"leave it at {off!r}"
                       + (" and set init_r (start rank) and target_r (average final rank)" if field == "r" else ""))
        self.check(self.target_modules is not None, "target_modules", "peft's AdaLoRA defaults differ from LoRA's",
                   "pass the targets, e.g. target_modules=['q_proj', 'v_proj']")
        self.check(self.init_lora_weights in (True, False), "init_lora_weights", "AdaLoRA has only its own init",
                   "pass True (Λ = 0, the identity) or False (all random, for tests)")

    def check_patterns(self) -> None:
        pattern = self.rank_pattern
        self.check(pattern is None or (isinstance(pattern, Mapping) and all(
            isinstance(v, tuple) and all(isinstance(b, bool) for b in v) for v in pattern.values())),
            "rank_pattern", "it maps '<module path>.lora_E' to kept-triplet flags", "leave it None; the scheduler fills it")

    def rank_for(self, key: str) -> int:
        """The rank of module ``key``: the kept triplets of the rank pattern, else init_r."""
        flags = (self.rank_pattern or {}).get(f"{key}.lora_E")
        return self.init_r if flags is None else sum(flags)


class AdaLoraDelta(WeightDelta):
    """``y + s / (n + 1e-5) * P (Λ ⊙ Q x)`` in peft's operation order (see the module docstring)."""

    ranknum: Tensor
    keep: Tensor

    def __init__(self, base: BaseLayer, r: int, init_r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features * math.prod(base.kernel_size), device=device))
        self.lora_E = nn.Parameter(torch.empty(r, 1, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=device))
        self.register_buffer("ranknum", torch.full((1,), float(init_r), device=device), persistent=False)
        self.register_buffer("keep", torch.ones(r, dtype=torch.bool, device=device), persistent=False)
        self.scaling = alpha if alpha > 0 else float(r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _scaled(self, t: Tensor) -> Tensor:
        return t * self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        if self.base.kind == "conv":  # peft convolves with the dense delta kernel
            kernel = self._scaled(self.lora_B @ (self.lora_A * self.lora_E)).view(self.lora_B.shape[0], -1,
                                                                                 *self.base.kernel_size)
            return (y + self.base.project(x, kernel)).to(y.dtype)
        return (y + self._scaled(x @ (self.lora_A * self.lora_E).T @ self.lora_B.T)).to(y.dtype)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """``s / (n + 1e-5) * P Λ Q`` in the canonical ``(out, in, *kernel)`` layout, in fp32."""
        product = self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())
        return (product * self.scaling / (self.ranknum.float() + 1e-5)).view(-1, self.base.in_features,
                                                                             *self.base.kernel_size)

    def tensors(self) -> dict[str, Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def tensors_to_save(self) -> dict[str, Tensor]:
        """The kept triplets only: the file holds the cut rank, as peft's does."""
        keep = self.keep
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep]}


def make_adalora(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> AdaLoraDelta:
    assert isinstance(config, AdaLoraConfig)
    if base.kind == "embedding" or (base.kind == "conv" and len(base.kernel_size) != 2):
        raise TargetError(f"AdaLoRA cannot adapt {key!r}, a {base.describe()}: like peft, it adapts Linear, "
                          "transformers Conv1D and Conv2d layers only. Fix: narrow target_modules.")
    delta = AdaLoraDelta(base, config.rank_for(key), config.init_r, config.lora_alpha, config.lora_dropout)
    with torch.no_grad():
        if config.init_lora_weights:
            nn.init.zeros_(delta.lora_E)
            nn.init.normal_(delta.lora_A, std=0.02)
            nn.init.normal_(delta.lora_B, std=0.02)
        else:
            [nn.init.normal_(param) for param in (delta.lora_A, delta.lora_E, delta.lora_B)]
    return delta


ADALORA = register(Method("ADALORA", AdaLoraConfig, make_adalora, last_fan_in_fan_out))
