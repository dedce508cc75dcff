"""BitFit: bias-terms fine-tuning (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models").

Update: only biases change, ``b' = b + Δb`` (the trained copy holds ``b'`` itself); every weight
stays frozen. Selection: the ``bias`` parameter of every module (``target_modules=None``), or of
the modules ``target_modules`` selects with peft's matching rules (any module type: Linear,
Conv, LayerNorm, ...). Modules to save (task heads) are trained in full instead.

BitFit changes no layer's computation, so it is a model-level method: it keeps a trained copy of
each selected bias (in the module tree under ``site_adapters.<adapter>``) and, while the adapter
is active, a forward hook adds ``b_i - b`` to the module's output: after every other adapter's
change on that layer (the hook sits on the layer's wrapper when it has one), so in a ``dt.Sum``
each change comes from the same base output; ``dt.Average`` weights it, ``dt.BatchSplit`` gives
it to its rows only. The module's own bias is never replaced, so switched off (``dt.disabled``,
another adapter active, ``dt.delete_adapter``, ``dt.unload(merge=False)``) the base is exact, and a
merge of other adapters writes the true base bias; ``dt.unload(merge=True)`` adds the summed
changes into the biases.
Init: the copies equal the originals (the identity). Parameter count: the sum of the selected
bias sizes. peft has no BitFit: the file keys are ``base_model.model.<module path>.bias`` (what
peft writes for the biases it trains with ``bias="all"``) and adapter_config.json has
``"peft_type": "BITFIT"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseLayer, channel_dim
from ..compose import Active, row_weights
from ..config import FILE_PREFIX, DeltaConfig, TargetedConfig
from ..errors import TargetError
from ..layer import STATE_ATTR, DeltaLayer, HookedDelta, ModelDelta, Removable
from ..sites import HOLDER
from ..registry import Method, Recipe, register, register_recipe
from ..state import logical_modules
from ..targets import is_target, nearest_names


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitFitConfig(TargetedConfig):
    """BitFit settings: which modules' biases train (None: all of them)."""

    peft_type: ClassVar[str] = "BITFIT"

    def validate(self) -> None:
        super().validate()
        self.check(self.layers_to_transform is None or isinstance(self.target_modules, tuple), "layers_to_transform",
                   "layer selection needs a list of target names", "also pass target_modules as a list of names")


class TrainedBias(nn.Module):
    """One trained copy, registered next to the bias it changes (``<module>.site_adapters.<adapter>.bias``),
    so that ``model.parameters()``, ``model.to()`` and optimizers see it, with the base bias it started
    from (a buffer, not saved): the change is ``bias - base`` even after a merge rewrote the module's bias."""

    base: Tensor

    def __init__(self, original: Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(original.detach().clone())
        self.register_buffer("base", original.detach().clone(), persistent=False)

    def change(self) -> Tensor:
        return self.bias - self.base


class BiasSelection(HookedDelta):
    """Trained copies of selected biases; while active, their changes are added to the outputs."""

    def __init__(self, owners: Mapping[str, nn.Module], originals: Mapping[str, nn.Parameter]) -> None:
        super().__init__()
        self.paths = list(owners)
        self._owners = [owners[p] for p in self.paths]  # a plain list: the owners belong to the model
        self._trained = [TrainedBias(originals[p]) for p in self.paths]  # placed in the model's tree
        self.biases = nn.ParameterList(t.bias for t in self._trained)

    def tensors(self) -> dict[str, Tensor]:
        return {f"{FILE_PREFIX}{path}.bias": bias for path, bias in zip(self.paths, self.biases)}

    def modules_changed(self) -> int:
        return len(self.paths)

    def place(self, model: nn.Module, name: str) -> None:
        for owner, trained in zip(self._owners, self._trained):
            holder = getattr(owner, HOLDER, None)
            if holder is None:
                holder = nn.ModuleDict()
                setattr(owner, HOLDER, holder)
            holder[name] = trained

    def unplace(self, model: nn.Module, name: str) -> None:
        for owner in self._owners:
            holder = getattr(owner, HOLDER, None)
            if holder is not None and name in holder:
                del holder[name]
                if not len(holder):
                    delattr(owner, HOLDER)

    @classmethod
    def install(cls, model: nn.Module, active: dict[str, ModelDelta], final: bool) -> list[Removable]:
        changes: dict[nn.Module, list[tuple[str, TrainedBias]]] = {}
        for name, part in active.items():
            assert isinstance(part, BiasSelection)
            for owner, trained in zip(part._owners, part._trained):
                changes.setdefault(owner, []).append((name, trained))
        if final:  # an unload that merges: the changes, summed, written into the biases themselves
            with torch.no_grad():
                for owner, entries in changes.items():
                    bias = owner._parameters["bias"]
                    assert bias is not None
                    bias.add_(sum((trained.change() for _, trained in entries), torch.zeros_like(bias)))
            return []
        active_set = model.__dict__[STATE_ATTR].active_set
        wrapper = {id(m.base_layer): m for m in model.modules() if isinstance(m, DeltaLayer)}
        return [wrapper.get(id(owner), owner).register_forward_hook(
            partial(_add_changes, active_set, entries, channel_dim(owner))) for owner, entries in changes.items()]


def _add_changes(active: Active, entries: Sequence[tuple[str, TrainedBias]], dim: int,
                 module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """The module's output plus every active copy's change ``b_i - b``, weighted per row as the
    composition says (``compose.row_weights``); after any other adapter's change on the layer."""
    for name, trained in entries:
        weights = row_weights(active.composition, name, output.shape[0])
        if weights is None:
            continue
        change = trained.change().to(output.dtype)
        shape = [1] * output.dim()
        shape[dim] = change.numel()
        per_row = torch.tensor(weights, dtype=output.dtype, device=output.device).view(-1, *[1] * (output.dim() - 1))
        output = output + per_row * change.view(shape)
    return output


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
    originals = {key: owner._parameters["bias"] for key, owner in owners.items()}
    return BiasSelection(owners, originals)  # type: ignore[arg-type]


BITFIT = register(Method("BITFIT", BitFitConfig, None, make_model_delta=select_biases))


register_recipe(Recipe("bitfit", "BitFit (Ben Zaken et al. 2022): train the biases only (all, or those of "
                                 "--target-modules)",
                       lambda run: BitFitConfig(target_modules=run.target_modules, **run.common)))
