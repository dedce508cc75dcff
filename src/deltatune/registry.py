"""The one list of methods: peft type name <-> config class <-> how the method attaches.

Each method file registers itself when imported (``deltatune.methods`` imports them all), so
adding a method touches its own file and the import list, and nothing else. A method file also
registers its ``Recipe``s: the ``--method`` choices of the command line and trainer, how each
builds its config from the run's options, and what the trainer must call for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .bases import BaseLayer
from .config import DeltaConfig
from .errors import AdapterFileError, DeltatuneError
from .layer import Delta, ModelDelta

MakeDelta = Callable[[BaseLayer, DeltaConfig, str, ModelDelta | None], Delta]
"""Build the delta for one base layer: (view of the layer, config, module name, the adapter's
model-level part if the method has one) -> Delta."""

MakeModelDelta = Callable[[nn.Module, DeltaConfig, Mapping[str, BaseLayer]], ModelDelta]
"""Build an adapter's model-level part: (model, config, the layers its deltas will adapt) -> ModelDelta."""

Finalize = Callable[[nn.Module, DeltaConfig, Mapping[str, BaseLayer]], DeltaConfig]
"""Settle config fields that depend on the model or the layers found: (model, config, layers) ->
config (e.g. peft's fan_in_fan_out for Conv1D, a prompt's token_dim from the model config)."""


def _keep(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> DeltaConfig:
    return config


def last_fan_in_fan_out(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> DeltaConfig:
    """A ``Finalize`` for configs with a ``fan_in_fan_out`` field: peft rewrites it for every Linear
    (False) or Conv1D (True) it wraps, in module order, so the stored value is the last one's;
    other layer kinds leave it alone."""
    linear = [v for v in views.values() if v.kind == "linear"]
    return config.replace(fan_in_fan_out=linear[-1].fan_in_fan_out) if linear else config


@dataclass(frozen=True)
class Method:
    """What the generic machinery needs to know about one method."""

    peft_type: str
    config_class: type[DeltaConfig]
    make_delta: MakeDelta | None
    """None for a method that changes no layer itself (only its model-level part)."""
    finalize: Finalize = _keep
    make_model_delta: MakeModelDelta | None = None
    """For a method with tensors shared by all its layer deltas, or a change with no layer of its own."""


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; its peft type name must be new."""
    if method.peft_type in _METHODS:
        raise DeltatuneError(f"a method named {method.peft_type!r} is already registered")
    _METHODS[method.peft_type] = method
    return method


def method_for(config: DeltaConfig) -> Method:
    """The method a config belongs to."""
    for method in _METHODS.values():
        if type(config) is method.config_class:
            return method
    raise DeltatuneError(f"{type(config).__name__} is not a registered method config; known: {sorted(_METHODS)}")


def method_named(peft_type: str, source: str = "adapter_config.json") -> Method:
    """The method for a peft_type string read from a file."""
    if peft_type not in _METHODS:
        raise AdapterFileError(
            f"{source}: peft_type {peft_type!r} is not supported by this deltatune version; "
            f"supported: {sorted(_METHODS)}."
        )
    return _METHODS[peft_type]


def method_names() -> list[str]:
    return sorted(_METHODS)


@dataclass(frozen=True)
class RecipeInput:
    """What a recipe builds a config from: the run's option values and what the run settled."""

    options: Mapping[str, Any]
    """Every recipe-declared option by name (``MethodOption``), as the run set it."""
    target_modules: tuple[str, ...] | str | None
    """From ``--target-modules`` ("all-linear" as a string), or None when not given."""
    default_targets: tuple[str, ...] | None
    """The architecture's usual attention projections, for recipes that need targets."""
    common: Mapping[str, Any]
    """Config fields every recipe passes through: ``task_type`` and ``modules_to_save``."""
    total_steps: int
    base_path: str | None = None
    """The base model's folder (its tokenizer, for a prompt initialised from text)."""
    run_options: Mapping[str, Any] = field(default_factory=dict)
    """The run's own options by name (``quantize``, ``quant_group_size``, ...), for a recipe whose
    config must fit how the run stores the base."""


TrainingHooks = Callable[[nn.Module], tuple[list[Callable[[int], None]], list[Callable[[], Tensor]]]]
"""For a method that needs the trainer's help: (model) -> (per-step callbacks, extra loss terms)."""

ParamGroups = Callable[[nn.Module, Mapping[str, Any], float, float], list[dict[str, Any]] | None]
"""For a recipe whose parameters train at different rates: (model, the run's option values, lr, weight
decay) -> the optimizer's parameter groups (torch's dicts: ``params``, ``lr``, ``weight_decay``), covering
every trainable parameter once; or None for one group at lr (what the options ask for may be plain)."""

GroupsFor = Callable[[nn.Module, float, float], list[dict[str, Any]] | None]
"""A recipe's ``ParamGroups`` with the run's options bound: (model, lr, weight decay) -> groups or None."""


@dataclass(frozen=True)
class MethodOption:
    """A run option a method adds to the command line and YAML files (``--<name>``)."""

    name: str
    type: str
    """"int", "float", "str", "bool" or "tuple[str, ...]" (a list of names)."""
    default: Any
    help: str


@dataclass(frozen=True)
class Recipe:
    """A ``--method`` choice of the command line and trainer: its options, how to build its config
    from them, and what the trainer must call for it."""

    name: str
    help: str
    build: Callable[[RecipeInput], DeltaConfig]
    hooks: TrainingHooks | None = None
    options: tuple[MethodOption, ...] = ()
    """Options this recipe reads that no earlier recipe declared (an option is declared once)."""
    default: bool = False
    """Whether this is the method a run uses when none is named (one recipe says so)."""
    loads: Callable[[Mapping[str, Any]], dict[str, Path]] | None = None
    """For a method built on adapters trained before (AdapterFusion): (the run's option values) ->
    the saved adapter folders to load, frozen, by name, before its own adapter is attached."""
    param_groups: ParamGroups | None = None
    """How the trainer's optimizer groups this recipe's parameters (a learning rate per group); None: one group."""


_RECIPES: dict[str, Recipe] = {}
_OPTIONS: dict[str, MethodOption] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a command-line method; its name and the options it declares must be new."""
    if recipe.name in _RECIPES:
        raise DeltatuneError(f"a recipe named {recipe.name!r} is already registered")
    taken = [o.name for o in recipe.options if o.name in _OPTIONS]
    if taken:
        raise DeltatuneError(f"recipe {recipe.name!r} declares options {taken} that another recipe already declared")
    if recipe.default and any(r.default for r in _RECIPES.values()):
        raise DeltatuneError(f"recipe {recipe.name!r} cannot be the default: {default_recipe()!r} already is")
    _RECIPES[recipe.name] = recipe
    _OPTIONS.update({o.name: o for o in recipe.options})
    return recipe


def method_options() -> tuple[MethodOption, ...]:
    """Every option the registered recipes declared, in registration order."""
    return tuple(_OPTIONS.values())


def default_recipe() -> str:
    """The ``--method`` a run uses when none is given."""
    return next((r.name for r in _RECIPES.values() if r.default), next(iter(_RECIPES), ""))


def recipe_names() -> tuple[str, ...]:
    """Every ``--method`` choice, in registration order."""
    return tuple(_RECIPES)


def recipe_named(name: str) -> Recipe:
    if name not in _RECIPES:
        raise DeltatuneError(f"no method named {name!r}; methods: {list(_RECIPES)}")
    return _RECIPES[name]


def training_hooks(name: str, model: nn.Module) -> tuple[list[Callable[[int], None]], list[Callable[[], Tensor]]]:
    """The per-step callbacks and loss terms recipe ``name`` needs (none for most methods)."""
    hooks = recipe_named(name).hooks
    return hooks(model) if hooks is not None else ([], [])


def param_groups_for(name: str, options: Mapping[str, Any]) -> GroupsFor | None:
    """How the optimizer should group recipe ``name``'s parameters under the run's ``options`` (the
    trainer calls it once the model is ready, after any sharding); None when the recipe has one group."""
    groups = recipe_named(name).param_groups
    if groups is None:
        return None
    return lambda model, lr, weight_decay: groups(model, options, lr, weight_decay)
