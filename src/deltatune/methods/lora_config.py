"""LoRA's settings (peft's ``LoraConfig`` field names and defaults) and their checks."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from ..config import TargetedConfig

_INITS = (True, False, "gaussian", "pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_\d+")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(TargetedConfig):
    """LoRA settings, with peft's field names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    peft_ignored: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"megatron_core": "megatron.core", "qalora_group_size": 16, "ensure_weight_tying": False}
    )
    peft_unsupported: ClassVar[Mapping[str, Any]] = MappingProxyType({
        key: None for key in ("alora_invocation_tokens", "arrow_config", "corda_config", "eva_config",
                              "kasa_config", "layer_replication", "lora_ga_config", "megatron_config",
                              "monteclora_config", "target_parameters", "trainable_token_indices",
                              "use_bdlora", "velora_config")
    } | {"loftq_config": {}, "use_qalora": False})

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False

    def validate(self) -> None:
        super().validate()
        self.check(_is_int(self.r) and self.r >= 1, "r", "the rank must be a positive integer", "pass e.g. r=8")
        self.check(_is_number(self.lora_alpha), "lora_alpha", "lora_alpha must be a number",
                   "pass e.g. lora_alpha=16 (twice r is common)")
        self.check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout",
                   "dropout must be in [0, 1)", "pass e.g. lora_dropout=0.05")
        self.check(self.bias in ("none", "all", "lora_only"), "bias", "bias must be 'none', 'all' or 'lora_only'",
                   "pass bias='none' unless you also want to train biases")
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            self.check(isinstance(getattr(self, flag), bool), flag, f"{flag} must be a bool", "pass True or False")
        init = self.init_lora_weights
        self.check(init in _INITS or (isinstance(init, str) and _PISSA_NITER.fullmatch(init) is not None),
                   "init_lora_weights", f"supported inits are {_INITS} and 'pissa_niter_<K>'",
                   "pass True (the standard zero-B init) or one of those")
        self.check(not self.lora_bias, "lora_bias", "a bias on lora_B is not implemented in this version yet",
                   "use lora_bias=False")
        self.check_patterns()

    def check_patterns(self) -> None:
        """rank_pattern and alpha_pattern: regular expressions mapped to ranks and alphas."""
        for field in ("rank_pattern", "alpha_pattern"):
            self.check(isinstance(getattr(self, field), Mapping), field, "it must map module names to values",
                       "pass a dict, e.g. {'q_proj': 16}")
        self.check(all(_is_int(v) and v >= 1 for v in self.rank_pattern.values()), "rank_pattern",
                   "every rank in the pattern must be a positive integer", "pass e.g. {'q_proj': 16}")
        self.check(all(_is_number(v) for v in self.alpha_pattern.values()), "alpha_pattern",
                   "every alpha in the pattern must be a number", "pass e.g. {'q_proj': 32}")
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field):
                _check_regex(self, field, key)

    def trained_biases(self) -> str:
        return {"none": "none", "all": "all", "lora_only": "adapted"}[self.bias]

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """The rank and alpha for the module named ``key`` (peft's pattern rule: first match wins)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return int(r), float(alpha)

    def rank_pattern_entry(self, key: str) -> str | None:
        """The rank_pattern key that sets the rank of the module named ``key``, or None when ``r`` does."""
        entry = _pattern_key(self.rank_pattern, key)
        return entry if entry in self.rank_pattern else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_regex(config: LoraConfig, field: str, key: object) -> None:
    """``key`` of the pattern mapping ``field`` must be a string that compiles as a regular expression."""
    why = f"the key {key!r} is not a string"
    if isinstance(key, str):
        try:
            re.compile(key)
            return
        except re.error as err:
            why = f"the key {key!r} is not a valid regular expression ({err})"
    config.check(False, field, why, "use module names or valid regular expressions as keys")


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str:
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), key)
