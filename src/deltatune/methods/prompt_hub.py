"""AdapterHub's prefix-tuning and prompt-tuning config dicts (``adapter_config.json``'s ``config``) <-> deltatune's
``PrefixTuningConfig`` / ``PromptTuningConfig``, both ways.

AdapterHub (``adapters`` 1.3) computes its prefixes as peft does (one table of per-layer keys and values, laid out
alike; from an embedding through a two-layer MLP, or a flat trained vector) but numbers the tokens from 0, where
peft numbers them after the prefix: a loaded prefix gets ``token_positions="from_zero"``. Its prompt tuning
inserts the prompt into the output of the embeddings module, not the input: ``insert_at="embeddings"``, or
``"embeddings_after_first"`` for ``combine="prefix_after_bos"``. Fields deltatune cannot reproduce are refused
with the field, the value and the fix (a per-layer gate, layers left out, an encoder-decoder's three prefix
sites, a trainable MLP of another activation or width); init-only fields are ignored, since a load overwrites
what they set. Files: ``prompt_hub_format``; docs/adapterhub.md, section 11.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..values import is_positive_int
from ..errors import AdapterFileError
from .bottleneck_block import ACTIVATIONS
from .prompt_config import PrefixTuningConfig, PromptTuningConfig

PREFIX, PROMPT = "prefix_tuning", "prompt_tuning"
PRESETS: dict[str, dict[str, Any]] = {"prefix_tuning": {"architecture": PREFIX},
                                      "prefix_tuning_flat": {"architecture": PREFIX, "flat": True},
                                      "prompt_tuning": {"architecture": PROMPT}}
"""AdapterHub's config names for these methods (a file may store one instead of the dict)."""
PREFIX_DEFAULTS: dict[str, Any] = {
    "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0, "encoder_prefix": True, "flat": False,
    "init_weights_seed": None, "leave_out": [], "non_linearity": "tanh", "prefix_length": 30, "shared_gating": True,
    "use_gating": False}
"""Every field of AdapterHub's ``PrefixTuningConfig`` with its default (taken for a key a file leaves out)."""
PROMPT_DEFAULTS: dict[str, Any] = {"combine": "prefix", "init_weights_seed": None, "prompt_init": "random_uniform",
                                   "prompt_init_text": None, "prompt_length": 10}
"""The same for ``PromptTuningConfig`` (its ``random_uniform_scale`` is a class attribute, never written)."""
COMBINE = {"prefix": "embeddings", "prefix_after_bos": "embeddings_after_first"}
"""AdapterHub's ``combine`` -> ``PromptTuningConfig.insert_at``."""
TRAINABLE_ACTIVATION = "tanh"
"""The activation of deltatune's prefix MLP (``PrefixEncoder``, peft's): a trainable MLP must use it."""


@dataclass(frozen=True)
class HubPrefix:
    """What decides how an AdapterHub prefix loads."""

    length: int
    flat: bool
    bottleneck: int
    non_linearity: str
    """Lower-cased, a key of ``ACTIVATIONS``."""


def architecture_of(data: object) -> str | None:
    """The method a file's ``config`` value holds, when it is one of these two (else None)."""
    if isinstance(data, str):
        return PRESETS[data]["architecture"] if data in PRESETS else None
    value = data.get("architecture") if isinstance(data, Mapping) else None
    return value if value in (PREFIX, PROMPT) else None


def hub_fields(data: object, source: str) -> dict[str, Any]:
    """The file's config with AdapterHub's defaults for what it leaves out (keys unknown to AdapterHub are kept)."""
    architecture = architecture_of(data)
    if architecture is None:
        raise AdapterFileError(f"{source}: 'config' is {data!r}, not a prefix or prompt tuning config; the file is corrupt.")
    given = PRESETS[data] if isinstance(data, str) else dict(data) if isinstance(data, Mapping) else {}
    return {**(PREFIX_DEFAULTS if architecture == PREFIX else PROMPT_DEFAULTS), **given}


def _refuse(source: str, field: str, value: Any, why: str, fix: str) -> AdapterFileError:
    return AdapterFileError(f"{source}: {field}={value!r}: {why}, so this adapter cannot be reproduced exactly. "
                            f"Fix: {fix}. The model was left unchanged.")


def prefix_settings(fields: Mapping[str, Any], source: str, trainable: bool, encoder_decoder: bool) -> HubPrefix:
    """Check a prefix config against what deltatune reproduces; the settings of the load."""
    if fields["use_gating"] is not False:
        raise _refuse(source, "use_gating", fields["use_gating"], "AdapterHub scales each layer's prefix by a gate "
                      "computed from that layer's input (UniPELT); deltatune's prefixes have no per-layer gate",
                      "use an adapter trained without use_gating")
    if not isinstance(fields["leave_out"], (list, tuple)):
        raise AdapterFileError(f"{source}: leave_out={fields['leave_out']!r} must be a list of layer numbers; the file is corrupt.")
    if fields["leave_out"]:
        raise _refuse(source, "leave_out", fields["leave_out"], "AdapterHub adds no prefix to those layers and sizes "
                      "its table for the others; deltatune's prefixes reach every attention layer",
                      "use an adapter trained without leave_out")
    if encoder_decoder:
        raise _refuse(source, "encoder_prefix", fields["encoder_prefix"], "on an encoder-decoder model AdapterHub puts "
                      "prefixes into the encoder, the decoder and the cross-attention (three tables); deltatune puts "
                      "them into the decoder's self-attention only (peft's layout)",
                      "load it with AdapterHub's adapters package, or train a deltatune prefix adapter")
    length, bottleneck, flat = fields["prefix_length"], fields["bottleneck_size"], fields["flat"]
    for name, value in (("prefix_length", length), ("bottleneck_size", bottleneck)):
        if not is_positive_int(value):
            raise AdapterFileError(f"{source}: {name}={value!r} must be a positive integer; the file is corrupt.")
    if not isinstance(flat, bool):
        raise AdapterFileError(f"{source}: flat={flat!r} must be true or false; the file is corrupt.")
    activation = str(fields["non_linearity"]).lower()
    if not flat and activation not in ACTIVATIONS:
        raise _refuse(source, "non_linearity", fields["non_linearity"], "deltatune does not know this activation",
                      f"use one of {sorted(ACTIVATIONS)}")
    dropout = fields["dropout"]
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise AdapterFileError(f"{source}: dropout={dropout!r} must be a number in [0, 1); the file is corrupt.")
    if trainable and dropout:
        raise _refuse(source, "dropout", dropout, "AdapterHub drops out prefix entries while training; deltatune's "
                      "prefixes have no dropout, so training would differ (evaluation does not)",
                      'load it frozen (trainable=False), or set "dropout": 0.0 in adapter_config.json to train without it')
    if trainable and not flat and activation != TRAINABLE_ACTIVATION:
        raise _refuse(source, "non_linearity", fields["non_linearity"], "deltatune's trainable prefix MLP uses tanh "
                      "(peft's)", "load it frozen (trainable=False): the prefixes are then computed once, with this "
                      "activation")
    return HubPrefix(length, flat, bottleneck, activation)


def prompt_place(fields: Mapping[str, Any], source: str) -> tuple[int, str]:
    """(prompt length, ``insert_at``) of a prompt config."""
    if fields["combine"] not in COMBINE:
        raise AdapterFileError(f"{source}: combine={fields['combine']!r} is none of AdapterHub's {sorted(COMBINE)}; "
                               "the file is corrupt.")
    if not is_positive_int(fields["prompt_length"]):
        raise AdapterFileError(f"{source}: prompt_length={fields['prompt_length']!r} must be a positive integer; "
                               "the file is corrupt.")
    return fields["prompt_length"], COMBINE[fields["combine"]]


def known(fields: Mapping[str, Any]) -> set[str]:
    """The keys AdapterHub's config of this architecture has (the others are ignored with a warning)."""
    defaults = PREFIX_DEFAULTS if fields.get("architecture") == PREFIX else PROMPT_DEFAULTS
    return {*defaults, "architecture", "random_uniform_scale"}


def prefix_to_hub(config: PrefixTuningConfig, flat: bool, bottleneck: int | None) -> dict[str, Any]:
    """AdapterHub's full ``PrefixTuningConfig`` dict for ``config`` written flat or with its MLP."""
    assert config.num_virtual_tokens is not None
    return {**PREFIX_DEFAULTS, "architecture": PREFIX, "flat": flat, "prefix_length": config.num_virtual_tokens,
            "bottleneck_size": bottleneck if bottleneck is not None else PREFIX_DEFAULTS["bottleneck_size"],
            "non_linearity": TRAINABLE_ACTIVATION}


def prompt_to_hub(config: PromptTuningConfig) -> dict[str, Any]:
    """AdapterHub's full ``PromptTuningConfig`` dict for ``config``."""
    combine = next(k for k, v in COMBINE.items() if v == config.insert_at)
    return {**PROMPT_DEFAULTS, "architecture": PROMPT, "combine": combine, "prompt_length": config.num_virtual_tokens}
