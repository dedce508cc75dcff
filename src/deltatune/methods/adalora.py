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
from ..errors import AdapterError, TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, last_fan_in_fan_out, register
from ..state import delta_layers, state_of
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
            self.check(isinstance(value, int) and not isinstance(value, bool) and value >= (1 if "r" in field else 0),
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
        for field, off in (("r", 8), ("use_dora", False), ("use_rslora", False), ("alpha_pattern", {})):
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


class AdaLoraScheduler:
    """The rank allocator of one trainable AdaLoRA adapter; call ``step(global_step)`` every step,
    after ``loss.backward()`` and before ``zero_grad()`` (peft's ``update_and_allocate``)."""

    def __init__(self, model: nn.Module, adapter: str | None = None) -> None:
        state = state_of(model)
        names = [n for n, c in state.configs.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
        if adapter is None and len(names) != 1:
            raise AdapterError(f"AdaLoraScheduler needs exactly one trainable AdaLoRA adapter, found {names}; "
                               "pass adapter=<name> (load with trainable=True to train a loaded one)")
        self.adapter = adapter or names[0]
        if self.adapter not in names:
            raise AdapterError(f"{self.adapter!r} is not a trainable AdaLoRA adapter; trainable ones: {names}")
        self.model = model
        self.deltas: dict[str, AdaLoraDelta] = {
            k: layer.deltas[self.adapter] for k, layer in delta_layers(model) if self.adapter in layer.deltas}  # type: ignore[misc]
        self.initial_budget = sum(d.lora_A.shape[0] for d in self.deltas.values())
        self.target_budget = self.config.target_r * len(self.deltas)
        self.smoothed: dict[int, Tensor] = {}
        self.uncertainty: dict[int, Tensor] = {}

    @property
    def config(self) -> AdaLoraConfig:
        config = state_of(self.model).require(self.adapter)
        assert isinstance(config, AdaLoraConfig)
        return config

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether to mask now): flat, then cubic decay, then flat."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.initial_budget - self.target_budget) * left**3 + self.target_budget), step % c.deltaT == 0

    def step(self, global_step: int) -> None:
        c = self.config
        final = (c.total_step or 0) - c.tfinal
        if global_step < final:
            self._update_importance()
            budget, now = self.budget(global_step)
            if now:
                self._mask_to(budget)
        elif global_step == final:  # the last allocation fixes the pattern; the statistics restart
            self._mask_to(self.budget(global_step)[0])
            self.smoothed, self.uncertainty = {}, {}
        else:
            with torch.no_grad():
                for delta in self.deltas.values():
                    delta.lora_E.masked_fill_(~delta.keep[:, None], 0.0)

    def orth_loss(self) -> Tensor:
        """``orth_reg_weight`` times the mean over P and Q matrices of ``||Q Qᵀ - I||_F`` / ``||Pᵀ P - I||_F``."""
        covs = [c for d in self.deltas.values() for c in (d.lora_A @ d.lora_A.T, d.lora_B.T @ d.lora_B)]
        norms = [torch.norm(c - torch.eye(*c.shape, dtype=c.dtype, device=c.device), p="fro") for c in covs]
        return self.config.orth_reg_weight * (sum(norms[1:], norms[0]) / len(norms)) if norms else torch.zeros(())

    @torch.no_grad()
    def _update_importance(self) -> None:
        c = self.config
        for delta in self.deltas.values():
            for param in (delta.lora_A, delta.lora_B, delta.lora_E):
                if param.grad is None:
                    raise AdapterError("AdaLoraScheduler.step needs gradients: call it after loss.backward() "
                                       "and before optimizer.zero_grad()")
                sensitivity = (param * param.grad).abs()
                smooth = c.beta1 * self.smoothed.get(id(param), torch.zeros_like(param)) + (1 - c.beta1) * sensitivity
                unc = self.uncertainty.get(id(param), torch.zeros_like(param))
                self.uncertainty[id(param)] = c.beta2 * unc + (1 - c.beta2) * (sensitivity - smooth).abs()
                self.smoothed[id(param)] = smooth

    def _score(self, param: Tensor) -> Tensor:  # sensitivity times uncertainty, per entry
        return self.smoothed[id(param)] * self.uncertainty[id(param)]

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        """Zero the Λ entries of the lowest-scored triplets so that ``budget`` remain (ties go too)."""
        scores = {key: self._score(d.lora_E).view(-1) + torch.cat(
            [self._score(d.lora_A).mean(dim=1, keepdim=True), self._score(d.lora_B).mean(dim=0).view(-1, 1)], 1).sum(1)
            for key, d in self.deltas.items()}
        cut = self.initial_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), cut)[0].item() if cut > 0 else -math.inf
        for key, delta in self.deltas.items():
            delta.keep.copy_(scores[key] > threshold)
            delta.lora_E.masked_fill_(~delta.keep[:, None], 0.0)
        pattern = {f"{key}.lora_E": tuple(d.keep.tolist()) for key, d in self.deltas.items()}
        state_of(self.model).configs[self.adapter] = self.config.replace(rank_pattern=pattern)


ADALORA = register(Method("ADALORA", AdaLoraConfig, make_adalora, last_fan_in_fan_out))
