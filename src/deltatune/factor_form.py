"""Adapters whose every layer change is a scaled low-rank product ``ΔW = s * B @ A``, as their methods say.

Adapter arithmetic (``combine``) works on these factors and nothing else, so a method opts in by
registering its config class together with its delta class (``register_factor_form``); generic
code never asks which method an adapter belongs to. Classes are matched exactly, not by
subclassing: a variant whose delta subclasses a factored one but changes the weight in another
way (a rescaling by a learned magnitude) is not a plain product, and takes part only if it
registers a form of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .config import DeltaConfig
from .layer import Delta

Factors = tuple[Tensor, Tensor, float]
"""``(B, A, s)``: ``B`` of shape ``(out, r, 1, ...)``, ``A`` of shape ``(r, in, *kernel)`` and the scaling
``s``, with ``ΔW = s * B.flatten(1) @ A.flatten(1)`` in the canonical ``(out, in * prod(kernel))`` layout."""


@dataclass(frozen=True)
class FactorForm:
    """What combining needs from a method whose layer changes are scaled low-rank products."""

    delta_class: type[Delta]
    """The exact delta class whose instances are such products."""
    factors: Callable[[Delta], Factors]
    """A delta's factors: its live parameters, so that filling them fills the delta."""
    max_rank: Callable[[DeltaConfig], int]
    """The largest rank any layer of an adapter with this config may have (what a result is sized by)."""
    combined_config: Callable[[DeltaConfig, int], DeltaConfig]
    """The config, derived from an adapter's, of an adapter of the same method whose layers hold factors
    of rank ``r`` applied as they are (scaling 1), built without touching the base weights."""


_FORMS: dict[type[DeltaConfig], FactorForm] = {}


def register_factor_form(config_class: type[DeltaConfig], form: FactorForm) -> None:
    """Declare that adapters with configs of exactly ``config_class`` are low-rank products (``form``)."""
    _FORMS[config_class] = form


def factor_form(config: DeltaConfig) -> FactorForm | None:
    """The factor form of adapters with this config, or None when its method registered none."""
    return _FORMS.get(type(config))
