"""IA3: learned rescaling of activations (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", (IA)^3).

Update: a vector ``l`` per adapted layer rescales one of its channel axes. On an attention
projection (keys, values) it scales the output, ``y = l * (W x + b)``, so
``W' = diag(l) W`` and ``b' = l * b``. On a feed-forward layer (``feedforward_modules``) it
scales the input, ``y = W (l * x) + b``, so ``W' = W diag(l)`` and the bias is unchanged.
For a convolution the same holds per channel (every kernel position scaled alike).

Init (``init_ia3_weights``): True = ones, so the adapter starts as the identity; False =
standard normal (for tests). Parameter count per layer: ``out`` (output scaling) or ``in``
(feed-forward, input scaling), channels for a convolution.

peft's format: one tensor ``ia3_l`` per layer, shaped ``(out, 1)`` / ``(1, in)`` on Linear and
GPT-2 Conv1D, ``(1, channels, 1, ...)`` on Conv2d/Conv3d. peft adapts no embeddings and no
Conv1d, so neither does this file (an adapter on them could not move to peft). Unmerge divides
by ``l`` exactly (peft adds 1e-8 to ``l`` first, which biases the weights it restores).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, MethodOption, Recipe, RecipeInput, last_fan_in_fan_out, register, register_recipe

_NOT_IN_PEFT = ("layers_to_transform", "layers_pattern")
"""TargetedConfig fields that peft's IA3Config lacks: kept unset, and never written."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(TargetedConfig):
    """IA3 settings, with peft's field names and defaults.

    ``target_modules`` and ``feedforward_modules`` left None take, when attached, the model type's
    defaults from peft's per-architecture tables (``hf.SCALED_ACTIVATION_TARGETS``,
    ``hf.SCALED_INPUT_LAYERS``; e.g. BERT ``key``, ``value``, ``output.dense`` with ``output.dense``
    feed-forward), each independently, as peft does; other models must pass them
    (``feedforward_modules=[]`` when no target is feed-forward). A list of feed-forward names must be a subset of a list of targets (peft's rule); a module is
    feed-forward when its full name ends with a list entry, or fully matches a regex string.
    """

    peft_type: ClassVar[str] = "IA3"
    condense_targets: ClassVar[bool] = False  # peft never shortens IA3 target lists
    default_tables: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"target_modules": "scaled_activations", "feedforward_modules": "scaled_inputs"})

    feedforward_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        value = self.feedforward_modules  # peft keeps it as a set: sorted and unique here
        if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
            object.__setattr__(self, "feedforward_modules", tuple(sorted(set(value))))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self._check_names("feedforward_modules")
        ff, targets = self.feedforward_modules, self.target_modules
        self.check(not (isinstance(ff, tuple) and isinstance(targets, tuple)) or set(ff) <= set(targets),
                   "feedforward_modules", f"every feed-forward name must also be in target_modules={list(targets or ())}",
                   "add the missing names to target_modules, or drop them from feedforward_modules")
        for flag in ("fan_in_fan_out", "init_ia3_weights"):
            self.check(isinstance(getattr(self, flag), bool), flag, f"{flag} must be a bool", "pass True or False")
        for field in _NOT_IN_PEFT:
            self.check(getattr(self, field) is None, field, "peft's IA3 has no layer selection by index",
                       "select layers with a regular expression in target_modules instead")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        for field in _NOT_IN_PEFT:
            del out[field]
        return out

    def is_feedforward(self, key: str) -> bool:
        """Whether module ``key`` gets input scaling; peft's rule (plain suffix, no dot boundary)."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, key) is not None
        return any(key.endswith(name) for name in ff or ())


class IA3Delta(WeightDelta):
    """Output scaling ``y * l`` (and ``W' = diag(l) W``, ``b' = l * b`` when merged)."""

    depends_on_weight = True  # ΔW = (l - 1) W

    def __init__(self, base: BaseLayer, features: int, shape: tuple[int, ...], scales_input: bool = False) -> None:
        super().__init__()
        self.base = base
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device))
        # l laid along the canonical (out, in, *kernel) weight: output rows here, input columns if feed-forward
        rows_cols = (1, features) if scales_input else (features, 1)
        self._weight_shape: tuple[int, ...] = (*rows_cols, *(1,) * len(base.kernel_size))

    def scale(self) -> Tensor:
        """``l`` shaped to broadcast over activations (channels last for linear, dim 1 for conv)."""
        return self.ia3_l.flatten() if self.base.kind == "linear" else self.ia3_l

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (y * self.scale()).to(y.dtype)

    def _laid_out(self, weight: Tensor) -> Tensor:
        return self.ia3_l.detach().to(weight).reshape(self._weight_shape)

    def merge(self, weight: Tensor) -> Tensor:
        return weight * self._laid_out(weight)

    def delta_weight(self, weight: Tensor) -> Tensor:
        return weight * (self._laid_out(weight) - 1)

    def inverse(self, merged: Tensor, state: Tensor | None) -> Tensor:
        return merged / self._laid_out(merged)  # exact division (peft adds 1e-8 to l first)

    def delta_bias(self, bias: Tensor) -> Tensor | None:
        return bias * (self.ia3_l.detach().to(bias).flatten() - 1)

    def tensors(self) -> dict[str, Tensor]:
        return {"ia3_l": self.ia3_l}


class IA3FeedForwardDelta(IA3Delta):
    """Input scaling ``base(x * l)`` (and ``W' = W diag(l)``, bias unchanged, when merged); an
    ``InputTransform``: alone on its layer, the layer runs ``base(transform_input(x))``."""

    def __init__(self, base: BaseLayer, features: int, shape: tuple[int, ...]) -> None:
        super().__init__(base, features, shape, scales_input=True)

    def transform_input(self, x: Tensor) -> Tensor:
        return (x.to(self.ia3_l.dtype) * self.scale()).to(x.dtype)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y  # the layer already ran the base on the transformed input

    def contribution(self, x: Tensor, y: Tensor) -> Tensor:
        """``base(x * l) - base(x)``: in a sum with other adapters, one more run of the base layer."""
        return self.base.module(self.transform_input(x)) - y

    def delta_bias(self, bias: Tensor) -> Tensor | None:
        return None  # scaling the input leaves the bias alone


def make_ia3(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> IA3Delta:
    assert isinstance(config, IA3Config)
    if base.kind not in ("linear", "conv") or len(base.kernel_size) == 1:
        raise TargetError(
            f"IA3 cannot adapt {key!r}, a {base.describe()}: like peft, it adapts Linear, transformers Conv1D, "
            "Conv2d and Conv3d layers only. Fix: exclude it with exclude_modules or narrow target_modules."
        )
    feedforward = config.is_feedforward(key)
    features = base.in_features if feedforward else base.out_features
    if base.kind == "conv":
        shape: tuple[int, ...] = (1, features, *(1,) * len(base.kernel_size))
    else:
        shape = (1, features) if feedforward else (features, 1)
    delta = (IA3FeedForwardDelta if feedforward else IA3Delta)(base, features, shape)
    if not config.init_ia3_weights:
        with torch.no_grad():
            nn.init.normal_(delta.ia3_l)
    return delta


IA3 = register(Method("IA3", IA3Config, make_ia3, last_fan_in_fan_out))


def build_ia3(run: RecipeInput) -> IA3Config:
    """Without --target-modules both lists take the architecture's defaults at attach time; with
    them, an absent --feedforward-modules means no target is feed-forward."""
    feedforward = run.options["feedforward_modules"] or (None if run.target_modules is None else ())
    return IA3Config(target_modules=run.target_modules, feedforward_modules=feedforward, **run.common)


register_recipe(Recipe(
    "ia3", "IA3 (Liu et al. 2022): learned scaling of keys, values and feed-forward inputs; targets default to "
           "peft's per-architecture lists (--target-modules with --feedforward-modules override them)",
    build_ia3,
    options=(MethodOption("feedforward_modules", "tuple[str, ...]", (),
                          "IA3: which of --target-modules are feed-forward layers (their input is scaled)"),)))
