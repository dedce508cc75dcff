"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Update: ``W' = W + s * B @ A`` with ``A: (r, in, *kernel)``, ``B: (out, r)`` and
``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). In forward the
product is never formed: ``y + s * B (A x)``.

Init (``init_lora_weights``): True = A Kaiming-uniform, B zero (for embeddings the reverse:
A zero, B normal, as peft does), so the adapter starts as the identity; "gaussian" = A normal
with std 1/r, B zero; False = both random (for tests); "pissa" / "pissa_niter_K" = the top-r
singular triplets of W split between B and A, and W replaced by its residual (Meng et al.
2024); "olora" = the first r columns of Q and rows of R of W = QR, W replaced by its residual
(Büyükakyüz 2024); both need r <= min(out, in) (a ConfigError while planning otherwise).
Parameter count per layer: ``r * (in * prod(kernel) + out)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, MethodOption, Recipe, RecipeInput, register, register_recipe
from .lora_init import check_rank_fits, factors_from_weight, takes_weight
from .lora_slot import RankSlot, scale_for

_INITS = (True, False, "gaussian", "pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_\d+")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(TargetedConfig):
    """LoRA settings, with peft's field names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    peft_ignored: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"megatron_core": "megatron.core", "qalora_group_size": 16, "ensure_weight_tying": False}
    )
    peft_unsupported: ClassVar[Mapping[str, Any]] = MappingProxyType({
        key: None for key in ("alora_invocation_tokens", "arrow_config", "corda_config", "eva_config",
                              "kasa_config", "layer_replication", "lora_ga_config", "megatron_config",
                              "monteclora_config", "target_parameters", "trainable_token_indices",
                              "use_bdlora", "velora_config")
    } | {"loftq_config": {}, "use_qalora": False})

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False

    def validate(self) -> None:
        super().validate()
        self.check(_is_int(self.r) and self.r >= 1, "r", "the rank must be a positive integer", "pass e.g. r=8")
        self.check(_is_number(self.lora_alpha), "lora_alpha", "lora_alpha must be a number",
                   "pass e.g. lora_alpha=16 (twice r is common)")
        self.check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout",
                   "dropout must be in [0, 1)", "pass e.g. lora_dropout=0.05")
        self.check(self.bias in ("none", "all", "lora_only"), "bias", "bias must be 'none', 'all' or 'lora_only'",
                   "pass bias='none' unless you also want to train biases")
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            self.check(isinstance(getattr(self, flag), bool), flag, f"{flag} must be a bool", "pass True or False")
        init = self.init_lora_weights
        self.check(init in _INITS or (isinstance(init, str) and _PISSA_NITER.fullmatch(init) is not None),
                   "init_lora_weights", f"supported inits are {_INITS} and 'pissa_niter_<K>'",
                   "pass True (the standard zero-B init) or one of those")
        self.check(not self.lora_bias, "lora_bias", "a bias on lora_B is not implemented in this version yet",
                   "use lora_bias=False")
        self.check_patterns()

    def check_patterns(self) -> None:
        """rank_pattern and alpha_pattern: regular expressions mapped to ranks and alphas."""
        for field in ("rank_pattern", "alpha_pattern"):
            self.check(isinstance(getattr(self, field), Mapping), field, "it must map module names to values",
                       "pass a dict, e.g. {'q_proj': 16}")
        self.check(all(_is_int(v) and v >= 1 for v in self.rank_pattern.values()), "rank_pattern",
                   "every rank in the pattern must be a positive integer", "pass e.g. {'q_proj': 16}")
        self.check(all(_is_number(v) for v in self.alpha_pattern.values()), "alpha_pattern",
                   "every alpha in the pattern must be a number", "pass e.g. {'q_proj': 32}")
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field):
                _check_regex(self, field, key)

    def trained_biases(self) -> str:
        return {"none": "none", "all": "all", "lora_only": "adapted"}[self.bias]

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """The rank and alpha for the module named ``key`` (peft's pattern rule: first match wins)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return int(r), float(alpha)

    def rank_pattern_entry(self, key: str) -> str | None:
        """The rank_pattern key that sets the rank of the module named ``key``, or None when ``r`` does."""
        entry = _pattern_key(self.rank_pattern, key)
        return entry if entry in self.rank_pattern else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_regex(config: LoraConfig, field: str, key: object) -> None:
    """``key`` of the pattern mapping ``field`` must be a string that compiles as a regular expression."""
    why = f"the key {key!r} is not a string"
    if isinstance(key, str):
        try:
            re.compile(key)
            return
        except re.error as err:
            why = f"the key {key!r} is not a valid regular expression ({err})"
    config.check(False, field, why, "use module names or valid regular expressions as keys")


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str:
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), key)


class LoraDelta(RankSlot, WeightDelta):
    """``y + s * B(A(dropout(x)))`` on any base kind; A and B kept in peft's shapes."""

    def __init__(self, base: BaseLayer, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        kernel = base.kernel_size
        self.base = base
        self.scaling = scaling
        self.A = nn.Parameter(torch.empty(r, base.in_features, *kernel, device=base.weight.device))
        self.B = nn.Parameter(torch.empty(base.out_features, r, *(1,) * len(kernel), device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._residual: Tensor | None = None  # the base weight less what a PiSSA / OLoRA init took

    def take_residual(self) -> Tensor | None:
        """The base weight less what the init moved into A and B (PiSSA, OLoRA), handed over once."""
        residual, self._residual = self._residual, None
        return residual

    def _hidden(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            x = self.dropout(x).to(self.A.dtype)
        return self.base.project(x, self.A)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.base.expand(y, self._hidden(x), self.B, self.scaling)

    def contribution(self, x: Tensor, y: Tensor) -> Tensor:
        return self.base.mapped(self._hidden(x), self.B) * self.scaling  # peft's operations, so sums match it

    def low_rank_weight(self) -> Tensor:
        """``s * B @ A`` in the canonical ``(out, in, *kernel)`` layout, in fp32."""
        product = self.B.float().flatten(1) @ self.A.float().flatten(1)
        return (product * self.scaling).view(self.B.shape[0], *self.A.shape[1:])

    def delta_weight(self, weight: Tensor) -> Tensor:
        return self.low_rank_weight()

    def tensors(self) -> dict[str, Tensor]:
        if self.base.kind == "embedding":
            return {"lora_embedding_A": self.A, "lora_embedding_B": self.B}
        return {"lora_A.weight": self.A, "lora_B.weight": self.B}

    @torch.no_grad()
    def initialize(self, init: bool | str) -> None:
        """Fill A and B per ``init_lora_weights`` (see the module docstring)."""
        if takes_weight(init):
            self._init_from_weight(str(init))
        elif self.base.kind == "embedding":
            nn.init.zeros_(self.A) if init is not False else nn.init.normal_(self.A)
            nn.init.normal_(self.B)
        elif init is False:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5)) if init is True else nn.init.normal_(
                self.A, std=1 / self.A.shape[0])
            nn.init.zeros_(self.B)

    def _init_from_weight(self, init: str) -> None:
        if self.base.kind != "linear":
            raise TargetError(f"init_lora_weights={init!r} needs a linear layer, got {self.base.describe()}")
        weight = self.base.read_weight().float()
        b, a = factors_from_weight(weight, self.A.shape[0], self.scaling, init)
        self.A.copy_(a)
        self.B.copy_(b)
        self._residual = weight - self.low_rank_weight()


MakeVariant = Callable[[BaseLayer, int, float, float, "bool | str"], LoraDelta]
VARIANTS: dict[str, MakeVariant] = {}
"""Deltas for LoraConfig flags that switch on a variant built on LoRA's (``use_dora``): each
variant's file adds itself here, so this file does not import it."""


def make_lora(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> LoraDelta:
    assert isinstance(config, LoraConfig)
    r, alpha = config.rank_and_alpha(key)
    check_rank_fits(base, config.init_lora_weights, key, r, type(config).__name__, config.rank_pattern_entry(key))
    scaling = scale_for(r, alpha, config.use_rslora)
    if config.use_dora:
        return VARIANTS["use_dora"](base, r, scaling, config.lora_dropout, config.init_lora_weights)
    delta = LoraDelta(base, r, scaling, config.lora_dropout)
    delta.initialize(config.init_lora_weights)
    return delta


def finalize_lora(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> DeltaConfig:
    """peft stores fan_in_fan_out=True exactly when a transposed (Conv1D) layer is adapted."""
    assert isinstance(config, LoraConfig)
    return config.replace(fan_in_fan_out=any(v.fan_in_fan_out for v in views.values()))


LORA = register(Method("LORA", LoraConfig, make_lora, finalize_lora))


def lora_fields(run: RecipeInput) -> dict[str, Any]:
    """The LoRA-family fields every LoRA recipe takes from the run options."""
    options = run.options
    return {"r": options["r"], "lora_alpha": options["lora_alpha"], "lora_dropout": options["lora_dropout"],
            "use_rslora": options["use_rslora"], "target_modules": run.target_modules, **run.common}


LORA_OPTIONS = (
    MethodOption("r", "int", 8, "rank (LoRA/DoRA; VeRA's shared projection; AdaLoRA's final average rank)"),
    MethodOption("lora_alpha", "float", 16.0, "LoRA scaling numerator (scale = alpha / r)"),
    MethodOption("lora_dropout", "float", 0.1, "dropout on the LoRA input (also VeRA's and AdaLoRA's)"),
    MethodOption("use_rslora", "bool", False, "rank-stabilised scaling alpha / sqrt(r)"),
)

register_recipe(Recipe("lora", "LoRA (Hu et al. 2021): W + (alpha / r) B A", lambda run: LoraConfig(**lora_fields(run)),
                       options=LORA_OPTIONS, default=True))
register_recipe(Recipe("dora", "DoRA (Liu et al. 2024): LoRA plus a trained magnitude per output",
                       lambda run: LoraConfig(use_dora=True, **lora_fields(run))))
