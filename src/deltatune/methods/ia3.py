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
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, MethodOption, Recipe, RecipeInput, last_fan_in_fan_out, register, register_recipe
from ..targets import is_target

_NOT_IN_PEFT = ("layers_to_transform", "layers_pattern")
"""TargetedConfig fields that peft's IA3Config lacks: kept unset, and never written."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(TargetedConfig):
    """IA3 settings, with peft's field names and defaults.

    ``target_modules`` and ``feedforward_modules`` left None take, when attached, the model type's
    defaults from peft's per-architecture tables (``hf.SCALED_ACTIVATION_TARGETS``,
    ``hf.SCALED_INPUT_LAYERS``; e.g. BERT ``key``, ``value``, ``output.dense`` with ``output.dense``
    feed-forward), each independently, as peft does; other models must pass them
    (``feedforward_modules=[]`` when no target is feed-forward). A module is feed-forward when its
    full name ends with a list entry, or fully matches a regex string. Two lists given here must
    nest (feed-forward names among the targets, peft's rule); names attach settles (a default, or
    "all-linear" expanded) need not, as in peft (``resolved``).
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

    def resolved(self, changes: Mapping[str, Any], names: Sequence[str]) -> IA3Config:
        """peft applies the feed-forward list to whatever targets attach settles, with no subset rule
        then (``target_modules="all-linear"`` with a default or given ``["down_proj"]``; chosen targets
        beside the architecture's default). Such a pair of lists is recorded as an equivalent nested
        pair, so the file loads in peft again (peft's own such files do not)."""
        targets = changes.get("target_modules", self.target_modules)
        ff = changes.get("feedforward_modules", self.feedforward_modules)
        if isinstance(targets, tuple) and isinstance(ff, tuple) and not set(ff) <= set(targets):
            adapted = [n for n in names if is_target(n, targets, self.exclude_modules,
                                                     modules_to_save=self.saved_module_names())]
            scaled = [n for n in adapted if any(n.endswith(name) for name in ff)]
            changes = {**changes, **_nested_lists(targets, adapted, scaled)}
        return self.replace(**changes)

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json") -> IA3Config:
        """peft 0.21.2 saves lists settled at attach as they are (all-linear's full names beside
        ``["down_proj"]``), which its own subset rule then refuses. Read as the nested pair they mean
        (the targets ending with a feed-forward name) when that is exact: when no feed-forward name is
        a longer suffix of a target (``mlp.down_proj`` beside ``down_proj`` may match only some of its
        layers); else the subset rule's error stands."""
        targets, ff = data.get("target_modules"), data.get("feedforward_modules")
        if isinstance(targets, list) and isinstance(ff, list) and not set(ff) <= set(targets) and not any(
                len(f) > len(t) and f.endswith(t) for f in ff for t in targets):
            data = {**data, "feedforward_modules": [t for t in targets if any(t.endswith(f) for f in ff)]}
        return super().from_peft_dict(data, source)

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


def _nested_lists(targets: tuple[str, ...], adapted: list[str], scaled: list[str]) -> dict[str, tuple[str, ...]]:
    """Lists that adapt ``adapted`` and make exactly ``scaled`` feed-forward, feed-forward names among
    the targets: the targets whose every match is in ``scaled``; when those miss one, full names."""
    def matches(name: str) -> list[str]:
        return [n for n in adapted if n.endswith(name)]  # peft's feed-forward rule: a plain suffix
    chosen = tuple(t for t in targets if matches(t) and set(matches(t)) <= set(scaled))
    if all(any(n.endswith(t) for t in chosen) for n in scaled):
        return {"feedforward_modules": chosen}
    return {"target_modules": tuple(adapted), "feedforward_modules": tuple(scaled)}


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
    """An absent --feedforward-modules takes the architecture's default at attach time, as a None
    ``feedforward_modules`` does in peft; the flag with no names means none, beside --target-modules
    (without them, run files from before None was the default record an empty list for absent)."""
    feedforward = run.options["feedforward_modules"]
    if feedforward is not None and not feedforward and run.target_modules is None:
        feedforward = None
    return IA3Config(target_modules=run.target_modules, feedforward_modules=feedforward, **run.common)


register_recipe(Recipe(
    "ia3", "IA3 (Liu et al. 2022): learned scaling of keys, values and feed-forward inputs; targets default to "
           "peft's per-architecture lists (--target-modules with --feedforward-modules override them)",
    build_ia3,
    options=(MethodOption("feedforward_modules", "tuple[str, ...]", None,
                          "IA3: which adapted layers are feed-forward (their input is scaled): names, matched as "
                          "suffixes; the flag alone beside --target-modules: none (default: the architecture's "
                          "feed-forward layers, as peft)"),)))
