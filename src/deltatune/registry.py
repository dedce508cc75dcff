"""The one list of methods: peft type name <-> config class <-> how the method attaches.

Each method file registers itself when imported (``deltatune.methods`` imports them all), so
adding a method touches its own file and the import list, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from .bases import BaseLayer
from .config import DeltaConfig
from .errors import AdapterFileError, DeltatuneError
from .layer import Delta, ModelDelta

MakeDelta = Callable[[BaseLayer, DeltaConfig, str, ModelDelta | None], Delta]
"""Build the delta for one base layer: (view of the layer, config, module name, the adapter's
model-level part if the method has one) -> Delta."""

MakeModelDelta = Callable[[nn.Module, DeltaConfig, Mapping[str, BaseLayer]], ModelDelta]
"""Build an adapter's model-level part: (model, config, the layers its deltas will adapt) -> ModelDelta."""

Finalize = Callable[[DeltaConfig, Mapping[str, BaseLayer]], DeltaConfig]
"""Settle config fields that depend on the layers found (e.g. peft's fan_in_fan_out for Conv1D)."""


def _keep(config: DeltaConfig, views: Mapping[str, BaseLayer]) -> DeltaConfig:
    return config


def last_fan_in_fan_out(config: DeltaConfig, views: Mapping[str, BaseLayer]) -> DeltaConfig:
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
