"""Attach and detach adapters: walk the model, match targets, wrap. Names no method.

Attaching is split in two so that a failure never leaves a half-adapted model: ``plan``
inspects the model and builds every new module without touching the model, and ``apply``
then only swaps modules in, which cannot fail. ``io.load`` fills a plan from a file in between.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from . import hf
from .bases import BaseLayer, base_layer_for, is_linear
from .compose import without
from .pretrained import accept_save
from .routing import accept_keyword
from .config import HEAD_ALIASES, TASK_HEADS, DeltaConfig, TargetedConfig
from .errors import AdapterError, TargetError
from .layer import ADAPTER_PARTS, Delta, DeltaLayer, ModelDelta, MovesBase, SavedModule, adapter_dtype
from .param_site import ParameterLayer, is_parameter_layer, parameter_sites
from .registry import method_for
from .state import STATE_ATTR, check_name, delta_layers, logical_modules, parent_of, set_active, state_of
from .targets import ALL_LINEAR, condense, is_target, nearest_names


@dataclass
class AttachPlan:
    """Everything one attach will add to a model, built before the model is changed."""

    name: str
    config: DeltaConfig
    deltas: dict[str, Delta] = field(default_factory=dict)
    views: dict[str, BaseLayer] = field(default_factory=dict)
    saved: dict[str, nn.Module] = field(default_factory=dict)
    base_weights: dict[str, Tensor] = field(default_factory=dict)
    """Replacement canonical weights for inits that move part of W into the delta."""
    model_delta: ModelDelta | None = None
    base_writes: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Base tensors a loaded file overwrites (embedding tables, trained biases): name -> (target, value)."""
    wrap_at: dict[str, str] = field(default_factory=dict)
    """Parameter sites not wrapped yet: delta key -> the module path its new wrapper goes to (outermost)."""

    def parameters(self) -> list[nn.Parameter]:
        modules = [*self.deltas.values(), *self.saved.values(), *([self.model_delta] if self.model_delta else [])]
        return [p for module in modules for p in module.parameters()]


def _check_name(model: nn.Module, name: str) -> None:
    check_name(name)
    existing = model.__dict__.get(STATE_ATTR)
    if existing is not None and name in existing.configs:
        raise AdapterError(
            f"an adapter named {name!r} is already attached; pick another name or remove it first "
            f"with dt.delete_adapter(model, {name!r})"
        )


CONDENSE_FROM = 20
"""peft shortens target lists of at least this many names (MIN_TARGET_MODULES_FOR_OPTIMIZATION)."""


def _resolve_targets(model: nn.Module, config: TargetedConfig) -> TargetedConfig:
    """Fill in default targets, expand "all-linear", and shorten long lists as peft does."""
    config = _expand_targets(model, config)
    targets = config.target_modules
    if isinstance(targets, tuple) and len(targets) >= CONDENSE_FROM and config.condense_targets:
        others = [n for n, _ in logical_modules(model)
                  if n not in targets and not any(n.endswith(f".{t}") for t in targets)]
        config = config.replace(target_modules=condense(targets, others))
    return config


def _expand_targets(model: nn.Module, config: TargetedConfig) -> TargetedConfig:
    """Fill in fields left None with the architecture defaults, and expand "all-linear"; the config
    takes them all at once (``resolved``), as fields that must agree may only agree once all are set."""
    changes = _filled_defaults(model, config)
    targets = changes.get("target_modules", config.target_modules)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = hf.output_head_name(model, config.task_type)
        changes["target_modules"] = tuple(sorted(n for n, m in logical_modules(model) if is_linear(m) and n != head))
    return config.resolved(changes, [n for n, _ in logical_modules(model)]) if changes else config


def _filled_defaults(model: nn.Module, config: TargetedConfig) -> dict[str, object]:
    """Each None field of ``default_tables`` with its value from its table for this model type; the
    file then records the resolved names, as peft's does."""
    filled: dict[str, object] = {}
    for field_name, table in config.default_tables.items():
        if getattr(config, field_name) is not None:
            continue
        default = hf.architecture_default(model, table)
        if default is None:
            raise TargetError(
                f"{type(config).__name__}.{field_name}=None is invalid: the model type {hf.model_type(model)!r} has "
                f"no default {field_name}. Fix: pass {field_name}, e.g. from this model's linear layers: "
                f"{_example_targets(model)}"
            )
        filled[field_name] = default
    return filled


def _example_targets(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in logical_modules(model) if is_linear(m)})[:4]


def _find_targets(model: nn.Module, config: TargetedConfig) -> dict[str, BaseLayer]:
    assert config.target_modules is not None
    views: dict[str, BaseLayer] = {}
    for key, module in logical_modules(model):
        if not is_target(key, config.target_modules, config.exclude_modules, config.layers_to_transform,
                         config.layers_pattern, config.saved_module_names()):
            continue
        view = base_layer_for(module)
        if view is None:
            raise TargetError(
                f"target_modules selects {key!r}, a {type(module).__name__}, which "
                f"{type(config).__name__} cannot adapt; it adapts Linear, transformers Conv1D, 4-bit Linear, Embedding "
                "and Conv1d/2d/3d layers (zero padding, groups=1). Fix: name the layers inside it, or exclude it with exclude_modules."
            )
        views[key] = view
    return views


def _find_all_targets(model: nn.Module, config: TargetedConfig) -> tuple[dict[str, BaseLayer], dict[str, str]]:
    """Layers and parameters the config selects (parameters' wrappers innermost first), and where
    each new parameter wrapper goes."""
    wanted = config.parameter_targets()
    sites = parameter_sites(model, wanted) if wanted else []
    views = {} if wanted and not config.target_modules else _find_targets(model, config)
    if not views and not sites:
        raise TargetError(_no_match_message(model, config))
    clash = sorted({s.wrap_at or s.key for s in sites} & set(views)) + [k for k in views if is_parameter_layer(model, k)]
    if clash:
        raise TargetError(f"{clash[0]!r} would be adapted both as a layer (target_modules) and through its parameters "
                          "(target_parameters); choose one: exclude it from target_modules or drop its parameters.")
    return {**views, **{s.key: s.view for s in sites}}, {s.key: s.wrap_at for s in sites if s.wrap_at is not None}


def _no_match_message(model: nn.Module, config: TargetedConfig) -> str:
    names = [n for n, _ in logical_modules(model)]
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules or ())
    types = Counter(type(m).__name__ for _, m in logical_modules(model) if base_layer_for(m) is not None)
    return (
        f"target_modules={config.target_modules!r} matched no adaptable module"
        f"{' in the selected layers' if config.layers_to_transform is not None else ''}. "
        f"Closest module names: {nearest_names(wanted, names)}. "
        f"Adaptable layer types present: {dict(types)}. "
        "A list entry must equal a module's full name or its last dotted parts; a string is a regular "
        "expression over the full name."
    )


def _saved_copies(model: nn.Module, config: DeltaConfig) -> dict[str, nn.Module]:
    wanted = config.saved_module_names()
    if not wanted:
        return {}
    found = {key: module for key, module in logical_modules(model)
             if key in wanted or any(key.endswith(f".{name}") for name in wanted)}
    # The task's head names peft writes into modules_to_save itself may match nothing (a model whose
    # head has another name): only names a user asked for must match.
    heads = TASK_HEADS.get(config.task_type or "", ())
    asked = [n for n in getattr(config, "modules_to_save", None) or () if n not in heads]
    if not found and asked:
        names = [n for n, _ in logical_modules(model)]
        raise TargetError(
            f"modules_to_save={list(asked)} matched no module. Closest names: {nearest_names(asked, names)}."
        )
    memo: dict[int, object] = {}  # one memo for every copy: a tensor shared in the base is shared by the copies
    return {key: _trainable_copy(module, memo if config.ties_saved_copies else {}) for key, module in found.items()}


def _with_head_alias(model: nn.Module, config: DeltaConfig) -> DeltaConfig:
    """``config`` naming the task head in ``modules_to_save`` when the model calls it by a name peft
    does not know (``HEAD_ALIASES``), so that it trains, saves and loads like any task head. For a new
    adapter only: a loaded one saves what its file says."""
    heads, aliases = TASK_HEADS.get(config.task_type or "", ()), HEAD_ALIASES.get(config.task_type or "", ())
    if not aliases or not hasattr(config, "modules_to_save"):
        return config
    names = {key.rpartition(".")[2] for key, _ in logical_modules(model)}
    found = [a for a in aliases if a in names and a not in config.saved_module_names()]
    if not found or any(h in names for h in heads):
        return config
    return config.replace(modules_to_save=(*(getattr(config, "modules_to_save") or ()), *found))


def _trainable_copy(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    clone = copy.deepcopy(module, memo)
    for param in clone.parameters():
        param.requires_grad_(True)
    return clone


def shared_tensors(saved: Mapping[str, nn.Module]) -> list[list[str]]:
    """Groups of parameter names (``<module path>.<name>``, as in a file) that name one tensor across the
    saved copies ``saved`` (ties kept from the base, ``DeltaConfig.ties_saved_copies``)."""
    names: dict[int, list[str]] = {}
    for key, module in saved.items():
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(f"{key}.{name}")
    return [group for group in names.values() if len(group) > 1]


def untied(saved: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The saved copies with no tensor shared between two of them (each copied on its own)."""
    return {key: copy.deepcopy(module) for key, module in saved.items()}


def plan(model: nn.Module, config: DeltaConfig, name: str) -> AttachPlan:
    """Work out and build what attaching ``config`` as ``name`` adds, without changing ``model``."""
    _check_name(model, name)
    method = method_for(config)
    views: dict[str, BaseLayer] = {}
    wrap_at: dict[str, str] = {}
    if method.make_delta is not None:  # a method without layer deltas selects what it changes itself
        if not isinstance(config, TargetedConfig):
            raise TargetError(f"{type(config).__name__} does not select modules; it cannot be attached here")
        config = _resolve_targets(model, config)
        views, wrap_at = _find_all_targets(model, config)
    config = method.finalize(model, config, views)
    saved = _saved_copies(model, config)
    result = AttachPlan(name, config, views=views, saved=saved, wrap_at=wrap_at)
    if method.make_model_delta is not None:
        result.model_delta = method.make_model_delta(model, config, views)
    for key, view in views.items():
        assert method.make_delta is not None
        delta = method.make_delta(view, config, key, result.model_delta)
        delta.to(device=view.weight.device, dtype=adapter_dtype(view.dtype))
        residual = delta.take_residual() if isinstance(delta, MovesBase) else None
        if residual is not None:
            view.check_writable()  # before anything changes: apply cannot fail
            result.base_weights[key] = residual
        result.deltas[key] = delta
    return result


def apply(model: nn.Module, attach_plan: AttachPlan) -> None:
    """Swap the planned modules into the model. Nothing here can fail half way.

    The base is frozen; the new adapter trains unless its config is in inference mode, and
    biases stay trainable for every adapter that trains them.
    """
    state = state_of(model, create=True)
    accept_keyword(model)
    accept_save(model)  # save_pretrained (Trainer, trl, user code) writes adapter folders, not wrapper keys
    for key, delta in attach_plan.deltas.items():
        layer = _layer_for(model, key, attach_plan)
        layer.deltas[attach_plan.name] = delta
        layer.train(layer.base_layer.training)  # new modules follow the mode of what they wrap (dropout)
        if key in attach_plan.base_weights:
            layer.view.write_weight(attach_plan.base_weights[key])
    for key, clone in attach_plan.saved.items():
        parent, child = parent_of(model, key)
        wrapper = getattr(parent, child)
        if not isinstance(wrapper, SavedModule):
            wrapper = SavedModule(wrapper, state.active_set)
            setattr(parent, child, wrapper)
        wrapper.copies[attach_plan.name] = clone
        wrapper.training = wrapper.original_module.training
    state.configs[attach_plan.name] = attach_plan.config
    for target, value in attach_plan.base_writes.values():
        state.record_base_write(attach_plan.name, target, value)
    if attach_plan.model_delta is not None:
        state.model_deltas[attach_plan.name] = attach_plan.model_delta
        attach_plan.model_delta.place(model, attach_plan.name)
    _freeze_base(model)
    for param in attach_plan.parameters():
        param.requires_grad_(not attach_plan.config.inference_mode)
    for name, config in state.configs.items():
        for param in trainable_biases(model, name).values():
            param.requires_grad_(param.requires_grad or not config.inference_mode)
    # Set again even when something is active: layers may have been wrapped (model-level parts hook in
    # again where they belong), and the new adapter may run within the active composition (a fusion).
    set_active(model, state.active_set.composition if state.active else attach_plan.name)


def _layer_for(model: nn.Module, key: str, attach_plan: AttachPlan) -> DeltaLayer:
    """The wrapper at ``key``, made and swapped in where there is none yet (a new parameter wrapper
    goes around whatever is at its module path, so creating them innermost first nests them)."""
    at = attach_plan.wrap_at.get(key)
    if at is None:
        parent, child = parent_of(model, key)
        layer = getattr(parent, child)
        if isinstance(layer, DeltaLayer):
            return layer
        at = key
    parent, child = parent_of(model, at)
    view = attach_plan.views[key]
    wrapper = ParameterLayer if view.kind == "parameter" else DeltaLayer
    layer = wrapper(getattr(parent, child), view, state_of(model).active_set)
    setattr(parent, child, layer)
    return layer


def _freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that does not belong to an adapter (deltas, saved copies, model-level parts)."""
    adapter_params: set[int] = {id(p) for part in state_of(model).model_deltas.values() for p in part.parameters()}
    for module in model.modules():
        if isinstance(module, DeltaLayer):
            adapter_params.update(map(id, module.deltas.parameters()))
        elif isinstance(module, SavedModule):
            adapter_params.update(map(id, module.copies.parameters()))
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)


def trainable_biases(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The base biases an adapter trains and saves (see ``TargetedConfig.trained_biases``), by state-dict name.

    Biases inside saved modules are excluded: the adapter's copy already holds them.
    """
    config = state_of(model).require(name)
    mode = config.trained_biases() if isinstance(config, TargetedConfig) else "none"
    if mode == "none":
        return {}
    if mode == "adapted":
        return {f"{key}.base_layer.bias": layer.base_layer.bias for key, layer in delta_layers(model)  # type: ignore[misc]
                if name in layer.deltas and isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter)}
    return {key: param for key, param in model.named_parameters()
            if key.rsplit(".", 1)[-1] == "bias" and not _inside_adapter(key)}


def _inside_adapter(key: str) -> bool:
    """Whether a state-dict name lies in an adapter's own modules or a saved module's frozen original."""
    return any(part in (*ADAPTER_PARTS, "original_module") for part in key.split(".")[:-1])


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> nn.Module:
    """Add an adapter to ``model`` in place and return the model.

    The base is frozen and the new adapter's parameters are trainable. The first adapter
    attached becomes active; later ones are added inactive (switch with ``dt.set_active``),
    as peft's ``add_adapter`` does. Raises before changing anything if the config does not fit.
    """
    apply(model, plan(model, _with_head_alias(model, config), name))
    return model


def remove(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` off the model and free its memory; unwrap layers left empty."""
    state = state_of(model)
    state.require(name)
    for key, layer in reversed(list(delta_layers(model))):  # innermost first: parameter wrappers nest
        if name not in layer.deltas:
            continue
        if name in layer.merged:
            keep = tuple(n for n in layer.merged if n != name)
            layer.unmerge()
            layer.merge(keep)
        del layer.deltas[name]
        if not len(layer.deltas):
            parent, child = parent_of(model, key)
            setattr(parent, child, layer.base_layer)
    for key, module in list(model.named_modules()):
        if isinstance(module, SavedModule) and name in module.copies:
            del module.copies[name]
            if not len(module.copies):
                parent, child = parent_of(model, key)
                setattr(parent, child, module.original_module)
    part = state.model_deltas.pop(name, None)
    if part is not None:
        part.switch(model, False)
        part.unplace(model, name)
    state.undo_base_writes(name)
    del state.configs[name]
    set_active(model, without(state.active_set.composition, name))
