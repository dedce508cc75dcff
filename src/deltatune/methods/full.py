"""Full fine-tuning as a method: every parameter of the model trains, so that it runs, saves,
merges and is analysed like any adapter (the reference row of every comparison table).

Update: on every targeted layer (``target_modules``; default "all-linear": every linear layer but
the output head) a dense change ``W' = W + ΔW``, ``b' = b + Δb``, both zero at init (the identity),
in the canonical ``(out, in, *kernel)`` layout; forward is ``y + ΔW x + Δb``. Every other module
that holds parameters (embeddings, layer norms, the task head) is copied and trained in full
through ``modules_to_save`` (``finalize`` adds them), so no parameter of the model stays frozen.

Training ``ΔW`` with ``W`` frozen follows the same trajectory as training ``W`` itself: the
gradient with respect to ``ΔW`` is the gradient with respect to ``W``, and Adam sees only
gradients. Only the rounding differs (``W x + ΔW x`` against ``(W + ΔW) x``). AdamW's decoupled
weight decay is the one departure: it shrinks ``ΔW`` towards 0, i.e. ``W`` towards the
pretrained ``W0`` rather than towards 0 (the "L2-SP" flavour of decay). With weight_decay 0 the
two are the same optimisation.

Memory: the frozen ``W`` stays in memory next to ``ΔW`` (as the base does for every adapter), so
the parameter-side cost is ``W + ΔW + grad + two Adam moments`` = 5 copies of the weights in fp32,
where training ``W`` in place needs 4. Peak-memory figures of this method include that extra copy.

Ties: copies of modules that share a tensor in the base share one trainable tensor too
(``ties_saved_copies``): a tied output head (``lm_head.weight`` is the embedding table, SmolLM2,
GPT-2) trains once, with the embedding, as training the tied model itself does; merging keeps the
tie. (peft's ``modules_to_save`` unties them unless ``ensure_weight_tying``; other methods keep
peft's default.) The file still holds each copy under its own key, equal values. A folder saved
before ties were kept, whose tied copies differ, loads with them untied, as it was trained; a
hot-swap of such a folder into a tied adapter is refused. A tie between a copied module and a
targeted layer (e.g. an embedding named in ``target_modules``) is not kept.

Parameter count: every parameter of the model once (embedding and norm copies, a tied table
once, ``ΔW`` and ``Δb`` of each targeted layer). peft has no such method: file keys are
``base_model.model.<layer path>.weight_change`` / ``.bias_change`` plus peft's layout for the
copied modules, and adapter_config.json has ``"peft_type": "FULL"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseLayer, channel_dim
from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetError
from ..layer import ModelDelta, WeightDelta
from ..registry import Method, Recipe, register, register_recipe
from ..state import logical_modules

DEFAULT_TARGETS = "all-linear"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullConfig(TargetedConfig):
    """Full fine-tuning: ΔW on ``target_modules`` (default every linear layer but the output
    head), every other module with parameters trained as a saved copy."""

    peft_type: ClassVar[str] = "FULL"
    condense_targets: ClassVar[bool] = False  # the list names every layer; kept as written
    ties_saved_copies: ClassVar[bool] = True  # a tied head trains once, as in the base

    target_modules: tuple[str, ...] | str | None = DEFAULT_TARGETS


class DenseDelta(WeightDelta):
    """``y + ΔW x + Δb`` with a dense, zero-initialised ``ΔW`` (and ``Δb`` where the layer has a bias)."""

    def __init__(self, base: BaseLayer) -> None:
        super().__init__()
        self.base = base
        weight = base.read_weight()
        self.weight_change = nn.Parameter(torch.zeros(weight.shape, device=weight.device))
        bias = base.module._parameters.get("bias")
        self.bias_change = nn.Parameter(torch.zeros(bias.shape, device=bias.device)) if bias is not None else None
        self._channel = channel_dim(base.module)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.is_floating_point():
            x = x.to(self.weight_change.dtype)
        change = self.base.project(x, self.weight_change)
        if self.bias_change is not None:
            shape = [1] * change.dim()
            shape[self._channel] = self.bias_change.numel()
            change = change + self.bias_change.view(shape)
        return y + change.to(y.dtype)

    def delta_weight(self, weight: Tensor) -> Tensor:
        return self.weight_change.float()

    def delta_bias(self, bias: Tensor) -> Tensor | None:
        return None if self.bias_change is None else self.bias_change.float()

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {"weight_change": self.weight_change}
        if self.bias_change is not None:
            out["bias_change"] = self.bias_change
        return out


def make_dense(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> DenseDelta:
    assert isinstance(config, FullConfig)
    return DenseDelta(base)


def _owns_parameters(module: nn.Module) -> bool:
    return any(isinstance(p, nn.Parameter) for p in module._parameters.values())


def copy_the_rest(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> DeltaConfig:
    """``config`` with every module that holds parameters and is neither a targeted layer nor inside
    a saved module added to ``modules_to_save``, so that the whole model trains."""
    assert isinstance(config, FullConfig)
    modules = dict(logical_modules(model))
    wanted = config.saved_module_names()
    saved = [k for k in modules if k in wanted or any(k.endswith(f".{n}") for n in wanted)]
    inside_saved = {k for k in modules if any(k == s or k.startswith(f"{s}.") for s in saved)}
    rest = [k for k, m in modules.items() if _owns_parameters(m) and k not in views and k not in inside_saved]
    clash = [(k, v) for k in rest for v in views if v.startswith(f"{k}.")]
    if clash:
        owner, layer = clash[0]
        raise TargetError(
            f"FullConfig: {owner!r} holds parameters of its own and contains the targeted layer {layer!r}; a module "
            "is either copied whole or has its layers changed. Fix: add the layers inside it to exclude_modules, "
            f"or name {owner!r} in modules_to_save.")
    if not rest:
        return config
    return config.replace(modules_to_save=(*(config.modules_to_save or ()), *rest))


FULL = register(Method("FULL", FullConfig, make_dense, copy_the_rest))


register_recipe(Recipe(
    "full", "full fine-tuning: every parameter trains (a dense zero-initialised ΔW on each --target-modules layer, "
            "default all-linear; everything else as trained copies); use a small --lr such as 5e-5",
    lambda run: FullConfig(target_modules=run.target_modules or DEFAULT_TARGETS, **run.common)))
