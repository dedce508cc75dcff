"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, "VeRA: Vector-based Random
Matrix Adaptation").

Update: ``W' = W + diag(b) B diag(d) A`` with one frozen random pair ``A: (r, in_max)``,
``B: (out_max, r)`` for the whole adapter, sized to the largest input and output of the adapted
layers; a layer uses the slices ``A[:, :in]`` and ``B[:out, :]``. Only the vectors
``d = vera_lambda_d: (r,)`` and ``b = vera_lambda_b: (out,)`` are trained. In forward:
``y + b * (B (d * (A x)))``, in peft's operation order.

Init: A then B drawn from one CPU ``torch.Generator`` seeded with ``projection_prng_key``, each
Kaiming-uniform for its own fan-in (bound ``sqrt(6 / fan_in)``), as peft does, so the same seed
gives peft's matrices; ``d = d_initial``, ``b = 0`` (the identity at start). With
``save_projection`` the pair is saved under peft's keys ``base_model.vera_A`` / ``vera_B``.
Parameter count per layer: ``r + out``. Like peft: Linear and GPT-2 Conv1D layers only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig, TargetedConfig
from ..values import is_int
from ..errors import TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, Recipe, last_fan_in_fan_out, register, register_recipe


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(TargetedConfig):
    """VeRA settings, with peft's field names and defaults. ``target_modules`` must be given."""

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        self.check(is_int(self.r) and self.r >= 1, "r", "the rank of the shared projection must be a positive integer",
                   "pass e.g. r=256 (VeRA uses far larger ranks than LoRA: only r + out numbers are trained per layer)")
        self.check(is_int(self.projection_prng_key), "projection_prng_key", "the seed must be an integer",
                   "pass e.g. projection_prng_key=0")
        self.check(isinstance(self.vera_dropout, (int, float)) and 0 <= self.vera_dropout < 1, "vera_dropout",
                   "dropout must be in [0, 1)", "pass e.g. vera_dropout=0.05")
        self.check(isinstance(self.d_initial, (int, float)) and math.isfinite(self.d_initial), "d_initial",
                   "d_initial must be a finite number", "pass e.g. d_initial=0.1")
        for flag in ("save_projection", "fan_in_fan_out", "init_weights"):
            self.check(isinstance(getattr(self, flag), bool), flag, f"{flag} must be a bool", "pass True or False")
        self.check(self.bias in ("none", "all", "vera_only"), "bias", "bias must be 'none', 'all' or 'vera_only'",
                   "pass bias='none' unless you also want to train biases")
        self.check(self.target_modules is not None, "target_modules",
                   "VeRA needs explicit targets (the shared projection is sized from them)",
                   "pass e.g. target_modules=['q_proj', 'v_proj']")
        self.check(self.exclude_modules is None, "exclude_modules", "peft's VeraConfig has no exclude_modules",
                   "narrow target_modules (a list or a regular expression) instead")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        del out["exclude_modules"]  # not a VeraConfig field in peft
        return out

    def trained_biases(self) -> str:
        return {"none": "none", "all": "all", "vera_only": "adapted"}[self.bias]


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform for a ReLU gain and the tensor's fan-in (its second dim), drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(ModelDelta):
    """The frozen random pair shared by every layer of one VeRA adapter (buffers, never trained)."""

    vera_A: Tensor
    vera_B: Tensor

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, saved: bool) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # A before B from one generator: the order fixes the numbers, and peft draws them this way
        self.register_buffer("vera_A", kaiming_uniform((r, in_max), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((out_max, r), generator), persistent=False)
        self.saved = saved

    def tensors(self) -> dict[str, Tensor]:
        return {"base_model.vera_A": self.vera_A, "base_model.vera_B": self.vera_B} if self.saved else {}


class VeraDelta(WeightDelta):
    """``y + b * (B[:out] (d * (A[:, :in] x)))`` with the adapter's shared A and B."""

    def __init__(self, base: BaseLayer, projection: VeraProjection, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.projection = projection  # a child of every delta of the adapter: moves with the model, once
        r = projection.vera_A.shape[0]
        self.vera_lambda_d = nn.Parameter(torch.empty(r, device=base.weight.device))
        self.vera_lambda_b = nn.Parameter(torch.empty(base.out_features, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _sliced(self) -> tuple[Tensor, Tensor]:
        return self.projection.vera_A[:, : self.base.in_features], self.projection.vera_B[: self.base.out_features]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        a, b = self._sliced()
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        return (y + self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)).to(y.dtype)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """``diag(b) B diag(d) A`` in the canonical ``(out, in)`` layout, in fp32."""
        a, b = (t.float() for t in self._sliced())
        return (self.vera_lambda_b.float()[:, None] * b) @ (self.vera_lambda_d.float()[:, None] * a)

    def tensors(self) -> dict[str, Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}


def make_projection(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> VeraProjection:
    assert isinstance(config, VeraConfig)
    in_max = max(v.in_features for v in views.values())
    out_max = max(v.out_features for v in views.values())
    return VeraProjection(config.r, in_max, out_max, config.projection_prng_key, config.save_projection)


def make_vera(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> VeraDelta:
    assert isinstance(config, VeraConfig) and isinstance(shared, VeraProjection)
    if base.kind != "linear":
        raise TargetError(
            f"VeRA cannot adapt {key!r}, a {base.describe()}: like peft, it adapts Linear and transformers Conv1D "
            "layers only. Fix: exclude it by narrowing target_modules."
        )
    delta = VeraDelta(base, shared, config.vera_dropout)
    with torch.no_grad():
        if config.init_weights:
            delta.vera_lambda_d.fill_(config.d_initial)
            nn.init.zeros_(delta.vera_lambda_b)
        else:  # peft's untouched init: d normal, b ones
            nn.init.normal_(delta.vera_lambda_d)
            nn.init.ones_(delta.vera_lambda_b)
    return delta


VERA = register(Method("VERA", VeraConfig, make_vera, last_fan_in_fan_out, make_projection))


register_recipe(Recipe(
    "vera", "VeRA (Kopiczko et al. 2024): shared random projections, trained scaling vectors; --r sizes the "
            "projection",
    lambda run: VeraConfig(r=run.options["r"], vera_dropout=run.options["lora_dropout"],
                           target_modules=run.target_modules or run.default_targets, **run.common)))
