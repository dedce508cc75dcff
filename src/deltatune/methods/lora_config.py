"""LoRA's settings (peft's ``LoraConfig`` field names and defaults) and their checks."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from ..config import TargetedConfig
from ..values import is_int
from .lora_loftq import loftq_dict, loftq_problem

_INITS = (True, False, "gaussian", "pissa", "olora", "loftq")
PISSA_NITER = re.compile(r"pissa_niter_\d+")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(TargetedConfig):
    """LoRA settings, with peft's field names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    peft_ignored: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"megatron_core": "megatron.core", "ensure_weight_tying": False}
    )
    peft_unsupported: ClassVar[Mapping[str, Any]] = MappingProxyType({
        key: None for key in ("alora_invocation_tokens", "arrow_config", "corda_config", "eva_config",
                              "kasa_config", "layer_replication", "lora_ga_config", "megatron_config",
                              "monteclora_config", "trainable_token_indices",
                              "use_bdlora", "velora_config")
    })

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    target_parameters: tuple[str, ...] | None = None
    """Parameters adapted directly, by full name or dotted suffix: experts' 3-D weights (``lora_param``)."""
    use_dora: bool = False
    lora_bias: bool = False
    loftq_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """``init_lora_weights="loftq"``'s settings: a ``LoftQConfig`` or its dict (peft stores the dict)."""
    use_qalora: bool = False
    """QA-LoRA (``lora_qalora``): lora_A sees the input averaged per group of ``qalora_group_size`` features."""
    qalora_group_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "loftq_config", loftq_dict(self.loftq_config))
        object.__setattr__(self, "target_parameters", _sorted_names(self.target_parameters))  # peft writes them sorted
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self.check(is_int(self.r) and self.r >= 1, "r", "the rank must be a positive integer", "pass e.g. r=8")
        self.check(_is_number(self.lora_alpha), "lora_alpha", "lora_alpha must be a number",
                   "pass e.g. lora_alpha=16 (twice r is common)")
        self.check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout",
                   "dropout must be in [0, 1)", "pass e.g. lora_dropout=0.05")
        self.check(self.bias in ("none", "all", "lora_only"), "bias", "bias must be 'none', 'all' or 'lora_only'",
                   "pass bias='none' unless you also want to train biases")
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            self.check(isinstance(getattr(self, flag), bool), flag, f"{flag} must be a bool", "pass True or False")
        init = self.init_lora_weights
        self.check(init in _INITS or (isinstance(init, str) and PISSA_NITER.fullmatch(init) is not None),
                   "init_lora_weights", f"supported inits are {_INITS} and 'pissa_niter_<K>'",
                   "pass True (the standard zero-B init) or one of those")
        self.check_loftq()
        self.check_qalora()
        self.check(not self.lora_bias, "lora_bias", "a bias on lora_B is not implemented in this version yet",
                   "use lora_bias=False")
        self.check_patterns()
        self.check_parameter_targets()

    def check_loftq(self) -> None:
        """LoftQ needs its settings, 4 bits, and plain LoRA (DoRA's magnitude would start from W, not dequant(Q))."""
        loftq = self.init_lora_weights == "loftq"
        problem = loftq_problem(self.loftq_config, needed=loftq)
        if problem is not None:
            self.check(False, "loftq_config" if self.loftq_config or not loftq else "init_lora_weights", *problem)
        if not loftq:
            if self.loftq_config:
                warnings.warn("loftq_config has no effect unless init_lora_weights='loftq'", stacklevel=4)
            return
        self.check(not self.use_dora, "use_dora", "LoftQ with DoRA is not implemented in this version",
                   "use use_dora=False with init_lora_weights='loftq'")

    def check_qalora(self) -> None:
        """QA-LoRA: a positive group size; plain LoRA's init and forward (no DoRA, no init from W)."""
        self.check(isinstance(self.use_qalora, bool), "use_qalora", "use_qalora must be a bool", "pass True or False")
        self.check(is_int(self.qalora_group_size) and self.qalora_group_size >= 1, "qalora_group_size",
                   "the group size must be a positive integer", "pass the base's quantization group size, e.g. 64")
        if not self.use_qalora:
            return
        self.check(self.peft_type == "LORA", "use_qalora", f"{self.peft_type} does not pool its input",
                   "use a LoraConfig for QA-LoRA")
        self.check(not self.use_dora, "use_dora", "QA-LoRA with DoRA is not defined (peft refuses it too)",
                   "use use_dora=False with use_qalora=True")
        self.check(self.init_lora_weights in (True, False, "gaussian"), "init_lora_weights",
                   "inits from the weight (PiSSA, OLoRA, LoftQ) do not fit QA-LoRA's pooled lora_A",
                   "pass init_lora_weights=True")

    def check_patterns(self) -> None:
        """rank_pattern and alpha_pattern: regular expressions mapped to ranks and alphas."""
        for field in ("rank_pattern", "alpha_pattern"):
            self.check(isinstance(getattr(self, field), Mapping), field, "it must map module names to values",
                       "pass a dict, e.g. {'q_proj': 16}")
        self.check(all(is_int(v) and v >= 1 for v in self.rank_pattern.values()), "rank_pattern",
                   "every rank in the pattern must be a positive integer", "pass e.g. {'q_proj': 16}")
        self.check(all(_is_number(v) for v in self.alpha_pattern.values()), "alpha_pattern",
                   "every alpha in the pattern must be a number", "pass e.g. {'q_proj': 32}")
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field):
                _check_regex(self, field, key)

    def check_parameter_targets(self) -> None:
        """target_parameters: a list of names, and only the settings peft's parameter LoRA supports."""
        names = self.target_parameters
        self.check(names is None or (isinstance(names, tuple) and all(isinstance(n, str) and n for n in names)),
                   "target_parameters", "it must be a list of parameter names",
                   "pass e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']")
        if not names:
            return
        for field, off, why in (("lora_dropout", 0.0, "dropout cannot be applied inside a parameter's product"),
                                ("use_dora", False, "DoRA on a parameter is not defined (peft refuses it too)"),
                                ("fan_in_fan_out", False, "a parameter's layout is read from its shape"),
                                ("lora_bias", False, "a parameter has no output of its own to add a bias to")):
            self.check(getattr(self, field) == off, field, f"{why} (target_parameters is set)",
                       f"use {field}={off!r}, or adapt these modules through target_modules in another adapter")
        self.check(self.init_lora_weights in (True, False, "gaussian"), "init_lora_weights",
                   "only True, False and 'gaussian' start a LoRA on a parameter",
                   "pass init_lora_weights=True (A random, B zero)")
        self.check(self.bias != "lora_only" or self.target_modules != (), "bias",
                   "'lora_only' trains the biases of adapted layers, and a parameter target has none",
                   "use bias='none' (or 'all' to train every bias of the model)")

    def parameter_targets(self) -> tuple[str, ...]:
        return self.target_parameters or ()

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


def _sorted_names(value: Any) -> Any:
    """A list of names sorted and without repeats; anything else as it is (validation reports it)."""
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(set(value)))
    return value


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
