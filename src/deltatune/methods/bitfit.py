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
Init: the copies equal the originals (the identity). Parameter count: the sum of the selected
bias sizes. peft has no BitFit: the file keys are ``base_model.model.<module path>.bias`` (what
peft writes for the biases it trains with ``bias="all"``) and adapter_config.json has
``"peft_type": "BITFIT"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetError
from ..layer import ModelDelta
from ..registry import Method, register
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
    """Trained copies of selected biases, swapped into their modules while the adapter is active."""

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

    def switch(self, model: nn.Module, on: bool) -> None:
        for owner, original, bias in zip(self._owners, self._originals, self.biases):
            current = owner._parameters["bias"]
            assert current is not None
            if on and current is not bias:
                _follow(bias, current)
                owner.bias = bias
            elif not on and current is bias:
                _follow(original, bias)
                owner.bias = original


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
