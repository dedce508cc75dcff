"""AdapterHub's bottleneck config dict (``adapter_config.json``'s ``config``) <-> ``BnConfig``, both ways.

AdapterHub (``adapters`` 1.x) writes every field of its ``BnConfig`` dataclass, with no ``architecture`` key.
``BnConfig`` here uses the same names for every field that changes what a block computes, so the mapping is
the identity on those; the rest are AdapterHub features deltatune does not build (Compacter's PHM layers,
invertible adapters, stochastic depth). They are accepted only while "off", because an adapter that uses
them cannot be reproduced exactly; an init-only field (``init_weights_seed``) is ignored, since a load
overwrites every initial value. The reading rules (defaults of a missing key, preset names, the legacy
activation names) are AdapterHub's own, so a folder means here what it means there (docs/adapterhub.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import AdapterFileError, ConfigError
from .bottleneck import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
"""Fields AdapterHub's ``BnConfig`` has no default for."""
SHARED_DEFAULTS: dict[str, Any] = {
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "is_parallel": False, "scaling": 1.0, "use_gating": False, "residual_before_ln": True,
    "adapter_residual_before_ln": False, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
}
"""Fields both libraries have, with AdapterHub's ``BnConfig`` defaults (used for a key a file leaves out;
note ``original_ln_before`` is False there, True in deltatune's ``BnConfig``, whose defaults are SeqBn's)."""
UNSUPPORTED: dict[str, Any] = {"phm_layer": False, "inv_adapter": None, "stochastic_depth": 0.0}
"""AdapterHub features deltatune does not build: the only value accepted, and the one written."""
COMPANIONS: dict[str, Any] = {
    "init_weights_seed": None, "inv_adapter_reduction_factor": None, "phm_dim": 4, "factorized_phm_W": True,
    "shared_W_phm": False, "shared_phm_rule": True, "factorized_phm_rule": False, "phm_c_init": "normal",
    "phm_init_range": 0.0001, "learn_phm": True, "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1,
    "phm_bias": True,
}
"""Fields with no effect on a loaded adapter (the seed of an init the load overwrites; settings of the
unsupported features while those are off): any value is read, AdapterHub's default is written."""
FIXES = {
    "phm_layer": "Compacter (phm_layer=True) replaces down/up by hypercomplex layers that deltatune does not build; "
                 "use a BnConfig adapter (seq_bn, double_seq_bn, par_bn)",
    "inv_adapter": "invertible adapters on the embeddings are not built by deltatune; use an adapter saved without "
                   "inv_adapter (e.g. seq_bn rather than seq_bn_inv)",
    "stochastic_depth": "stochastic depth (DropPath) is training-only and not built by deltatune; it does not change "
                        "eval outputs, so for inference set \"stochastic_depth\": 0.0 in adapter_config.json",
}
PRESETS: dict[str, Callable[[], BnConfig]] = {
    "seq_bn": SeqBnConfig, "pfeiffer": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig, "houlsby": DoubleSeqBnConfig,
    "par_bn": ParBnConfig, "parallel": ParBnConfig,
    "scaled_par_bn": lambda: ParBnConfig(scaling="learned"), "scaled_parallel": lambda: ParBnConfig(scaling="learned"),
}
"""AdapterHub's bottleneck preset names (an old file may store one instead of the dict)."""
LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
"""adapter-transformers 2.x names, renamed by AdapterHub when the file has no ``version``."""
BOOLEANS = ("mh_adapter", "output_adapter", "cross_adapter", "original_ln_before", "original_ln_after", "ln_before",
            "ln_after", "is_parallel", "use_gating", "adapter_residual_before_ln")
SUPPORTED = "AdapterHub bottleneck adapters (BnConfig and its presets seq_bn/pfeiffer, double_seq_bn/houlsby, par_bn/parallel)"


def to_hub(config: BnConfig) -> dict[str, Any]:
    """The full AdapterHub ``BnConfig`` dict for ``config``, as ``adapters`` 1.3 writes it (every field)."""
    out: dict[str, Any] = {**COMPANIONS, **UNSUPPORTED}
    for field in (*REQUIRED, *SHARED_DEFAULTS):
        value = getattr(config, field)
        out[field] = dict(value) if isinstance(value, Mapping) else list(value) if isinstance(value, tuple) else value
    if isinstance(config.scaling, (int, float)):  # AdapterHub rejects an int scaling ("Unknown scaling type")
        out["scaling"] = float(config.scaling)
    return dict(sorted(out.items()))


def architecture_of(data: object) -> str | None:
    """The adapter method a file's ``config`` value holds: None for a bottleneck adapter (AdapterHub's rule:
    no ``architecture`` key), else its architecture or preset name."""
    if isinstance(data, str):
        return None if data in PRESETS else data
    architecture = data.get("architecture") if isinstance(data, Mapping) else None
    return None if architecture is None else str(architecture)


def from_hub(data: object, source: str, versioned: bool, has_inverse_weights: bool, legacy_task: bool) -> BnConfig:
    """A ``BnConfig`` from a file's ``config`` value (a dict or a preset name), read as AdapterHub reads it.

    ``versioned``: the file has a ``version`` (else legacy activation names are renamed); an ``inv_adapter`` of a
    legacy task adapter whose file has no invertible weights is dropped, as AdapterHub drops it; any other
    unsupported feature, unknown architecture or bad value raises an AdapterFileError saying what is supported."""
    if not isinstance(data, (str, Mapping)):
        raise AdapterFileError(f"{source}: 'config' is {data!r}, not an adapter config dict; the file is corrupt.")
    architecture = architecture_of(data)
    if architecture is not None:
        raise AdapterFileError(f"{source}: the adapter is an AdapterHub {architecture!r} adapter; deltatune reads {SUPPORTED} "
                               "only. Fix: load it with AdapterHub's adapters package, or save the method in peft's format.")
    fields: dict[str, Any] = to_hub(PRESETS[data]()) if isinstance(data, str) else dict(data)
    nested = fields.get("invertible_adapter")  # adapter-transformers 1.x nested the invertible adapter's settings
    if nested:
        fields["inv_adapter"] = nested.get("block_type", "nice") if isinstance(nested, Mapping) else nested
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise AdapterFileError(f"{source}: the bottleneck config lacks {missing}, which AdapterHub requires; the file is "
                               "incomplete. Fix: re-save it with AdapterHub's save_adapter.")
    if fields.get("inv_adapter") is not None and legacy_task and not has_inverse_weights:
        fields["inv_adapter"] = None  # AdapterHub's _fix_legacy_config: declared, never saved, removed on load
    for key, off in UNSUPPORTED.items():
        value = fields.get(key, off)
        if value != off and not (key == "stochastic_depth" and value in (None, 0)):
            raise AdapterFileError(f"{source}: {key}={value!r} is an AdapterHub feature deltatune does not implement, so "
                                   f"this adapter cannot be reproduced exactly. Fix: {FIXES[key]}.")
    unknown = sorted(set(fields) - set(REQUIRED) - set(SHARED_DEFAULTS) - set(UNSUPPORTED) - set(COMPANIONS)
                     - {"architecture", "invertible_adapter"})
    if unknown:
        warnings.warn(f"{source}: ignoring keys unknown to deltatune's AdapterHub reader: {unknown}", stacklevel=3)
    kwargs = {k: fields.get(k, default) for k, default in {**{k: None for k in REQUIRED}, **SHARED_DEFAULTS}.items()}
    bad = [k for k in BOOLEANS if not isinstance(kwargs[k], bool)]
    if bad:
        raise AdapterFileError(f"{source}: {bad[0]}={kwargs[bad[0]]!r} must be true or false; the file is corrupt.")
    if not versioned and isinstance(kwargs["non_linearity"], str):
        kwargs["non_linearity"] = LEGACY_ACTIVATIONS.get(kwargs["non_linearity"], kwargs["non_linearity"])
    if not isinstance(kwargs["leave_out"], (list, tuple)):
        raise AdapterFileError(f"{source}: leave_out={kwargs['leave_out']!r} must be a list of layer numbers.")
    try:
        return BnConfig(**{**kwargs, "leave_out": tuple(kwargs["leave_out"])})
    except (ConfigError, TypeError, AttributeError) as err:
        raise AdapterFileError(f"{source}: {err}") from err
