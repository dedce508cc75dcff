"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Update: ``W' = W + s * B @ A`` with ``A: (r, in, *kernel)``, ``B: (out, r)`` and
``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). In forward the
product is never formed: ``y + s * B (A x)``.

Init (``init_lora_weights``): True = A Kaiming-uniform, B zero (for embeddings the reverse:
A zero, B normal, as peft does), so the adapter starts as the identity; "gaussian" = A normal
with std 1/r, B zero; False = both random (for tests); "pissa" / "pissa_niter_K" = the top-r
singular triplets of W split between B and A, and W replaced by its residual (Meng et al.
2024); "olora" = the first r columns of Q and rows of R of W = QR, W replaced by its residual
(Büyükakyüz 2024); "loftq" = B A the rank-r SVD of W's 4-bit quantization error, W replaced by
its NF4 round trip (Li et al. 2023, ``lora_loftq.py``); all need r <= min(out, in) (a
ConfigError while planning otherwise).
Parameter count per layer: ``r * (in * prod(kernel) + out)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig
from ..errors import ConfigError, TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, MethodOption, Recipe, RecipeInput, register, register_recipe
from .lora_config import PISSA_NITER, LoraConfig
from .lora_init import check_rank_fits, factors_from_weight, takes_weight
from .lora_loftq import holds_nf4
from .lora_slot import RankSlot, scale_for

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
        self._residual: Tensor | None = None  # the base weight a PiSSA / OLoRA / LoftQ init leaves

    def take_residual(self) -> Tensor | None:
        """The base weight the init leaves (PiSSA, OLoRA: W less s B A; LoftQ: dequant(Q)), handed over once."""
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
    def initialize(self, init: bool | str, loftq: Mapping[str, int] | None = None) -> None:
        """Fill A and B per ``init_lora_weights`` (see the module docstring); ``loftq``: the
        config's ``loftq_config`` (bits, iterations) for ``init="loftq"``."""
        if takes_weight(init):
            self._init_from_weight(str(init), loftq or {})
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

    def _init_from_weight(self, init: str, loftq: Mapping[str, int]) -> None:
        if self.base.kind != "linear":
            raise TargetError(f"init_lora_weights={init!r} needs a linear layer, got {self.base.describe()}")
        weight = self.base.read_weight().float()
        if init == "loftq" and holds_nf4(weight, self.base.dtype):
            self.initialize(True)  # B A = 0 either way: plain QLoRA's A and B; the base stays (loading onto 4 bits)
            return
        b, a, base = factors_from_weight(weight, self.A.shape[0], self.scaling, init, loftq)
        self.A.copy_(a)
        self.B.copy_(b)
        self._residual = weight - self.low_rank_weight() if base is None else base


MakeVariant = Callable[[BaseLayer, int, float, float, "bool | str"], LoraDelta]
VARIANTS: dict[str, MakeVariant] = {}
"""Deltas for LoraConfig flags that switch on a variant built on LoRA's (``use_dora``): each
variant's file adds itself here, so this file does not import it."""

ConfiguredVariant = Callable[[BaseLayer, LoraConfig, int, float], LoraDelta]
CONFIGURED_VARIANTS: dict[str, ConfiguredVariant] = {}
"""Variants that read more of the config (``use_qalora``: its group size), by flag: ``(base, config, r, scaling)``."""

KINDS: dict[str, Callable[[BaseLayer, LoraConfig], WeightDelta]] = {}
"""Deltas for base kinds LoRA's own class does not adapt (a parameter site, ``lora_param``), by kind."""


def make_lora(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> WeightDelta:
    assert isinstance(config, LoraConfig)
    if base.kind in KINDS:
        return KINDS[base.kind](base, config)
    r, alpha = config.rank_and_alpha(key)
    check_rank_fits(base, config.init_lora_weights, key, r, type(config).__name__, config.rank_pattern_entry(key))
    scaling = scale_for(r, alpha, config.use_rslora)
    if config.use_dora:
        return VARIANTS["use_dora"](base, r, scaling, config.lora_dropout, config.init_lora_weights)
    for flag, make_variant in CONFIGURED_VARIANTS.items():
        if getattr(config, flag):
            return make_variant(base, config, r, scaling)
    delta = LoraDelta(base, r, scaling, config.lora_dropout)
    delta.initialize(config.init_lora_weights, config.loftq_config)
    return delta


def finalize_lora(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> DeltaConfig:
    """peft stores fan_in_fan_out=True exactly when a transposed (Conv1D) layer is adapted."""
    assert isinstance(config, LoraConfig)
    return config.replace(fan_in_fan_out=any(v.fan_in_fan_out for v in views.values()))


LORA = register(Method("LORA", LoraConfig, make_lora, finalize_lora))


GROUPINGS: dict[str, Callable[[nn.Module, float, float, float], list[dict[str, Any]]]] = {}
"""Optimizer groupings of LoRA's parameters: ``loraplus.py`` adds "loraplus" ((model, lr, ratio, weight
decay) -> LoRA+'s groups), so this file does not import it (it imports ``LoraDelta`` from here)."""

CLI_INITS = "true, gaussian, pissa, pissa_niter_K (K randomized-SVD iterations) or olora"


def init_option(run: RecipeInput) -> bool | str:
    """``--init-lora-weights`` as LoraConfig's value; refused (ConfigError, before the model changes):
    unknown words, inits that rewrite the base weight on a 4-bit base, and LoftQ (see its message)."""
    text = run.options["init_lora_weights"]
    word = text.strip().lower()
    if word == "loftq":
        raise ConfigError("options", "init_lora_weights", text, "LoftQ must see the full-precision weight before "
                          "the base is quantized, and `deltatune train --quantize nf4` quantizes it before the adapter "
                          "is attached (LoftQ would then start as plain QLoRA)", "use true (QLoRA) here, or the "
                          "Python API: dt.attach(model, dt.LoraConfig(init_lora_weights='loftq', loftq_config="
                          "dt.LoftQConfig())), then dt.quantize (docs/quantization.md)")
    if word == "true":
        return True
    if word not in ("gaussian", "pissa", "olora") and not PISSA_NITER.fullmatch(word):
        raise ConfigError("options", "init_lora_weights", text, f"must be one of {CLI_INITS}",
                          "pass e.g. --init-lora-weights pissa (false, random A and B, is for tests: Python API only)")
    quantize = run.run_options.get("quantize", "none")
    if takes_weight(word) and quantize != "none":
        raise ConfigError("options", "init_lora_weights", text, f"{word} replaces each base weight by its residual, "
                          f"which a base stored in 4 bits (--quantize {quantize}) cannot hold",
                          "drop --quantize, or use --init-lora-weights true or gaussian")
    return word


def lora_fields(run: RecipeInput) -> dict[str, Any]:
    """The LoRA-family fields every LoRA recipe takes from the run options."""
    options = run.options
    ratio = options["loraplus_lr_ratio"]
    if not (ratio >= 0 and math.isfinite(ratio)):
        raise ConfigError("options", "loraplus_lr_ratio", ratio, "must be >= 0 (0 = off)",
                          "pass e.g. --loraplus-lr-ratio 16 (LoRA+'s recommendation) or 0")
    return {"r": options["r"], "lora_alpha": options["lora_alpha"], "lora_dropout": options["lora_dropout"],
            "use_rslora": options["use_rslora"], "init_lora_weights": init_option(run),
            "target_modules": run.target_modules, **run.common}


def lora_param_groups(model: nn.Module, options: Mapping[str, Any], lr: float,
                      weight_decay: float) -> list[dict[str, Any]] | None:
    """``--loraplus-lr-ratio R > 0``: LoRA+'s groups (``dt.loraplus_optimizer``'s: B at lr * R); 0: one group."""
    ratio = options["loraplus_lr_ratio"]
    return GROUPINGS["loraplus"](model, lr, ratio, weight_decay) if ratio else None


LORA_OPTIONS = (
    MethodOption("r", "int", 8, "rank (LoRA/DoRA; VeRA's shared projection; AdaLoRA's final average rank)"),
    MethodOption("lora_alpha", "float", 16.0, "LoRA scaling numerator (scale = alpha / r)"),
    MethodOption("lora_dropout", "float", 0.1, "dropout on the LoRA input (also VeRA's and AdaLoRA's)"),
    MethodOption("use_rslora", "bool", False, "rank-stabilised scaling alpha / sqrt(r)"),
    MethodOption("init_lora_weights", "str", "true", f"LoRA/DoRA/QA-LoRA init: {CLI_INITS}; pissa and olora "
                 "replace each base weight by its residual (eval, predict and merge re-derive it)"),
    MethodOption("loraplus_lr_ratio", "float", 0.0, "LoRA+ (LoRA/DoRA/QA-LoRA): train B at lr x this ratio "
                 "(the groups of dt.loraplus_optimizer; 16 is the paper's choice); 0 = off"),
)

register_recipe(Recipe("lora", "LoRA (Hu et al. 2021): W + (alpha / r) B A", lambda run: LoraConfig(**lora_fields(run)),
                       options=LORA_OPTIONS, default=True, param_groups=lora_param_groups))
register_recipe(Recipe("dora", "DoRA (Liu et al. 2024): LoRA plus a trained magnitude per output",
                       lambda run: LoraConfig(use_dora=True, **lora_fields(run)), param_groups=lora_param_groups))
