"""BitFit: bias-terms fine-tuning (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models").

Update: only biases change, ``b' = b + Δb`` (the trained copy holds ``b'`` itself); every weight
stays frozen. Selection: the ``bias`` parameter of every module (``target_modules=None``), or of
the modules ``target_modules`` selects with peft's matching rules (any module type: Linear,
Conv, LayerNorm, ...). Modules to save (task heads) are trained in full instead.

BitFit changes no layer's computation, so it is a model-level method: it keeps a trained copy of
each selected bias and, while the adapter is active, the module's ``bias`` attribute points to
that copy; switched off (``dt.disabled``, another adapter active, ``dt.delete_adapter``,
``dt.unload(merge=False)``) the original Parameter is put back, so the base output is exact.
Several active BitFit adapters are summed, ``b + Σ (b_i - b)``, like every other method.
Init: the copies equal the originals (the identity). Parameter count: the sum of the selected
bias sizes. peft has no BitFit: the file keys are ``base_model.model.<module path>.bias`` (what
peft writes for the biases it trains with ``bias="all"``) and adapter_config.json has
``"peft_type": "BITFIT"``.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..bases import BaseLayer
from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetError
from ..layer import ModelDelta
from ..registry import Method, Recipe, register, register_recipe
from ..state import STATE_ATTR, logical_modules
from ..targets import is_target, nearest_names

FILE_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitFitConfig(TargetedConfig):
    """BitFit settings: which modules' biases train (None: all of them)."""

    peft_type: ClassVar[str] = "BITFIT"

    def validate(self) -> None:
        super().validate()
        self.check(self.layers_to_transform is None or isinstance(self.target_modules, tuple), "layers_to_transform",
                   "layer selection needs a list of target names", "also pass target_modules as a list of names")


def _follow(param: nn.Parameter, like: Tensor) -> None:
    """Bring a parameter that was outside the module tree to where the model is now (a ``model.to``
    while it was swapped out did not move it); keeps the Parameter object, so optimizers hold."""
    if param.device != like.device or param.dtype != like.dtype:
        param.data = param.data.to(like)


class BiasSelection(ModelDelta):
    """Trained copies of selected biases, swapped into their modules while the adapter is active.

    Several active BitFit adapters on one module add up: the module computes with
    ``b + Σ (b_i - b)``, substituted for its bias by a forward pre-hook (and put back after the
    call), so each copy keeps its gradient; one active adapter simply has its copy swapped in.
    """

    def __init__(self, owners: Mapping[str, nn.Module], originals: Mapping[str, nn.Parameter]) -> None:
        super().__init__()
        self.paths = list(owners)
        # plain lists, not registered: the owners belong to the model, the originals are base parameters
        self._owners = [owners[p] for p in self.paths]
        self._originals = [originals[p] for p in self.paths]
        self.biases = nn.ParameterList(nn.Parameter(originals[p].detach().clone()) for p in self.paths)

    def original_of(self, param: nn.Parameter) -> nn.Parameter:
        """The base bias behind ``param`` if it is one of this adapter's copies, else ``param``."""
        return next((o for o, b in zip(self._originals, self.biases) if b is param), param)

    def tensors(self) -> dict[str, Tensor]:
        return {f"{FILE_PREFIX}{path}.bias": bias for path, bias in zip(self.paths, self.biases)}

    def modules_changed(self) -> int:
        return len(self.paths)

    def slots(self) -> list[tuple[nn.Module, nn.Parameter, nn.Parameter]]:
        """(module, original bias, this adapter's copy) for every selected bias."""
        return list(zip(self._owners, self._originals, self.biases))

    def switch(self, model: nn.Module, on: bool) -> None:
        type(self).combine(model, [self] if on else [], [self])

    @classmethod
    def combine(cls, model: nn.Module, active: Sequence[ModelDelta], every: Sequence[ModelDelta],
                final: bool = False) -> None:
        copies: dict[nn.Module, tuple[nn.Parameter, list[nn.Parameter]]] = {}
        for part in every:
            assert isinstance(part, BiasSelection)
            for owner, original, copy in part.slots():
                copies.setdefault(owner, (original, []))[1].extend([copy] if part in active else [])
        for owner, (original, on) in copies.items():
            _unhook(owner)
            if len(on) == 1:
                _follow(on[0], owner._parameters["bias"])  # type: ignore[arg-type]
                owner.bias = on[0]
            elif not on:
                _follow(original, owner._parameters["bias"])  # type: ignore[arg-type]
                owner.bias = original
            elif final:  # the sum, fixed as the module's own bias
                with torch.no_grad():
                    owner.bias = nn.Parameter(_summed(original, on).detach(), requires_grad=False)
            else:
                owner.bias = original
                _hook(owner, original, on)


def _summed(original: Tensor, copies: Sequence[Tensor]) -> Tensor:
    """``b + Σ (b_i - b)``: every copy's change from the same base bias, added."""
    total = original
    for copy in copies:
        total = total + (copy - original)
    return total


_SUM_HOOKS: weakref.WeakKeyDictionary[nn.Module, list[RemovableHandle]] = weakref.WeakKeyDictionary()
"""Hooks that put a sum of biases in place during a module's forward, by module."""


def _hook(owner: nn.Module, original: nn.Parameter, copies: Sequence[nn.Parameter]) -> None:
    def put_sum(module: nn.Module, args: Any) -> None:
        module._parameters["bias"] = _summed(original, copies)  # type: ignore[assignment]

    def put_back(module: nn.Module, args: Any, output: Any) -> None:
        module._parameters["bias"] = original

    _SUM_HOOKS[owner] = [owner.register_forward_pre_hook(put_sum),
                         owner.register_forward_hook(put_back, always_call=True)]


def _unhook(owner: nn.Module) -> None:
    for handle in _SUM_HOOKS.pop(owner, []):
        handle.remove()


def _base_bias(model: nn.Module, param: nn.Parameter) -> nn.Parameter:
    """The original bias even when another BitFit adapter has its copy swapped in right now."""
    state = model.__dict__.get(STATE_ATTR)
    for part in state.model_deltas.values() if state is not None else ():
        if isinstance(part, BiasSelection):
            param = part.original_of(param)
    return param


def select_biases(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> BiasSelection:
    assert isinstance(config, BitFitConfig)
    targets = ".*" if config.target_modules is None else config.target_modules
    owners: dict[str, nn.Module] = {}
    for key, module in logical_modules(model):
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter) and is_target(key, targets, config.exclude_modules, config.layers_to_transform,
                                                       config.layers_pattern, config.saved_module_names()):
            owners[key] = module
    if not owners:
        names = [n for n, m in logical_modules(model) if isinstance(m._parameters.get("bias"), nn.Parameter)]
        raise TargetError(
            f"BitFitConfig.target_modules={config.target_modules!r} selects no module with a bias. Modules with "
            f"biases: {len(names)}{', e.g. ' + str(nearest_names([str(targets)], names)) if names else ''}. "
            "Fix: name modules that have a bias (a list entry must equal a module's full name or its last dotted parts)."
        )
    with torch.no_grad():
        originals = {key: _base_bias(model, owner._parameters["bias"]) for key, owner in owners.items()}  # type: ignore[arg-type]
    return BiasSelection(owners, originals)


BITFIT = register(Method("BITFIT", BitFitConfig, None, make_model_delta=select_biases))


register_recipe(Recipe("bitfit", "BitFit (Ben Zaken et al. 2022): train the biases only (all, or those of "
                                 "--target-modules)",
                       lambda run: BitFitConfig(target_modules=run.target_modules, **run.common)))
