"""Fold adapters into the base weights and back, and strip deltatune from a model.

Merging is computed in fp32 and stored in the base dtype. ``unmerge`` subtracts what was
added, so the original weights come back up to the rounding of the base dtype: in fp32 within
about 1e-6 absolute; in bf16 within half a bf16 ulp of max(|W|, |W + dW|), which is large
relative to a small |W| when |dW| is much larger (a bf16 merge is lossy, as in peft).
Adapter arithmetic (combining adapters) arrives with the merging issue.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .bases import base_layer_for
from .compose import Composition, Sum
from .errors import AdapterError
from .pretrained import release_save
from .routing import release_keyword
from .state import delta_layers, drop_state, parent_of, saved_modules, state_of


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Fold the active adapters (or ``names``, which must be active) into the base weights."""
    _fold(model, names)


def _fold(model: nn.Module, names: str | Sequence[str] | None) -> None:
    state = state_of(model)
    todo = state.active if names is None else ((names,) if isinstance(names, str) else tuple(names))
    for name in todo:
        state.require(name)
        if name not in state.active:
            raise ValueError(f"merge: adapter {name!r} is not active; activate it with dt.set_active first")
    _require_sum(state.active_set.composition, "merge")
    _require_mergeable(model, todo, "merge")
    for _, layer in delta_layers(model):
        layer.merge(todo)


def _require_mergeable(model: nn.Module, names: Sequence[str], what: str) -> None:
    """Refuse, before anything changes, adapters whose change cannot live in the weights."""
    parts = state_of(model).model_deltas
    stuck = [n for n in names if n in parts and not parts[n].mergeable]
    if stuck:
        raise AdapterError(f"{what}: adapters {stuck} change activations, not weights ({type(parts[stuck[0]]).__name__}); "
                           "there is no weight to fold them into. Keep them attached (dt.save stores them), or "
                           "switch them off with dt.set_active before merging the others.")


def _require_sum(composition: Composition, what: str) -> None:
    if type(composition) is not Sum:
        raise AdapterError(f"{what}: the active composition {composition!r} is not a plain sum, and a weight holds "
                           "only a sum of changes. Activate a name or a list of names to merge them.")


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    state_of(model)
    for _, layer in delta_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True, requantize: bool = False) -> nn.Module:
    """Remove every deltatune wrapper and return the plain model (changed in place).

    With ``merge=True`` the active adapters are folded into the weights first and the active
    adapter's copies of saved modules replace the originals: the result computes what the
    adapted model computed. Layers whose weight is stored quantized cannot hold the merged
    weight; each base kind decides what replaces them (``BaseLayer.merged_module``): by default
    a dense layer in the compute dtype, for every quantized layer of the model, so the result is
    a dense model; ``requantize=True`` quantizes the merged weights again instead (lossy; a
    warning gives the measured error) and leaves layers without adapters as they are. Dense
    layers ignore ``requantize``. With ``merge=False`` the original model comes back, including
    base tensors (embedding tables, biases) that loading an adapter file overwrote; with
    ``merge=True`` only the active adapters' such writes stay.
    """
    state = state_of(model)
    if merge:
        _require_sum(state.active_set.composition, "unload(merge=True)")
        _require_mergeable(model, state.active, "unload(merge=True)")
    else:
        unmerge(model)
    state.switch_model_deltas(model, state.active if merge else (), final=True)  # they stay only when merging
    for key, layer in reversed(list(delta_layers(model))):  # innermost first: parameter wrappers nest
        parent, child = parent_of(model, key)
        setattr(parent, child, layer.unloaded(requantize) if merge else layer.base_layer)
    for key, module in list(saved_modules(model)):
        parent, child = parent_of(model, key)
        setattr(parent, child, module.current() if merge else module.original_module)
    if merge:
        _replace_unadapted(model, requantize)
    for name in reversed(list(state.base_writes)):  # what loads wrote into the base, newest first
        if not merge or name not in state.active:
            state.undo_base_writes(name)
    for name, part in state.model_deltas.items():
        part.unplace(model, name)
    drop_state(model)
    release_keyword(model)
    release_save(model)
    return model


def _replace_unadapted(model: nn.Module, requantize: bool) -> None:
    """Give layers that carried no adapter the same treatment (a quantized one becomes dense)."""
    for key, module in list(model.named_modules()):
        view = base_layer_for(module) if key else None
        if view is None:
            continue
        replacement = view.merged_module(None, None, requantize)
        if replacement is not module:
            parent, child = parent_of(model, key)
            setattr(parent, child, replacement)
