"""The prompt-space configs, with peft's field names and defaults: ``PromptTuningConfig``
(PROMPT_TUNING), ``PromptEncoderConfig`` (P-tuning, P_TUNING) and ``PrefixTuningConfig``
(PREFIX_TUNING: prefix tuning, and P-tuning v2 without the projection).

The shape fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
``num_transformer_submodules``, ``encoder_hidden_size``) may be left unset: attaching fills them
from the model's config as peft does (``complete``) and the saved config records them. For prefix
tuning on a model with grouped-query attention, peft sizes the prefix for the key/value heads:
``token_dim = head_dim * num_key_value_heads`` and ``num_attention_heads = num_key_value_heads``.

Two fields follow AdapterHub's conventions instead of peft's when set (``prompt_hub`` reads and writes
AdapterHub's folders): ``PrefixTuningConfig.token_positions`` and ``PromptTuningConfig.insert_at``. peft's
files cannot express them, so such an adapter is saved with ``format="adapters"`` only (``HUB_ONLY``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from torch import nn

from ..config import DeltaConfig, check_modules_to_save, saved_with_heads
from ..values import is_positive_int
from ..errors import AdapterFileError, ConfigError

SEQ_2_SEQ = "SEQ_2_SEQ_LM"
"""The task type whose models get virtual tokens for two transformer stacks (peft's rule)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptLearningConfig(DeltaConfig):
    """Fields every prompt-space method shares (peft's ``PromptLearningConfig``)."""

    file_prefix: ClassVar[str] = "base_model."  # peft wraps the model itself, with no tuner model between
    HUB_ONLY: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """Fields peft's files cannot hold -> the value meaning peft's convention (left out of adapter_config.json)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: tuple[str, ...] | None = None

    def validate(self) -> None:
        super().validate()
        self.check(is_positive_int(self.num_virtual_tokens), "num_virtual_tokens",
                   "it must be a positive number of virtual tokens", "pass e.g. num_virtual_tokens=20")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            self.check(getattr(self, name) is None or is_positive_int(getattr(self, name)), name,
                       "it must be a positive integer or None (None: read from the model's config)",
                       "leave it unset, or pass the model's value")
        check_modules_to_save(self, self.modules_to_save)

    def saved_module_names(self) -> tuple[str, ...]:
        return saved_with_heads(self.modules_to_save, self.task_type)

    def to_peft_dict(self) -> dict[str, Any]:
        """peft's dict; refused for an adapter following AdapterHub's convention, which peft would load as another model."""
        other = {k: getattr(self, k) for k, peft_value in self.HUB_ONLY.items() if getattr(self, k) != peft_value}
        if other:
            raise AdapterFileError(
                f"cannot write this {type(self).__name__} in peft's format: {other} is AdapterHub's convention, which "
                "peft's adapter_config.json cannot express (peft would load a different model). Fix: save it with "
                "format='adapters' (AdapterHub's folder).")
        return {k: v for k, v in super().to_peft_dict().items() if k not in self.HUB_ONLY}

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the virtual-token table: one set per transformer stack (two for an encoder-decoder)."""
        assert self.num_virtual_tokens is not None and self.num_transformer_submodules is not None
        return self.num_virtual_tokens * self.num_transformer_submodules

    def shape_fields(self, model_config: Mapping[str, Any]) -> dict[str, int]:
        """The unset shape fields, from a transformers config as a dict (peft's reading of it)."""
        found: dict[str, int] = {}
        fill = {"num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
                "token_dim": ("hidden_size", "n_embd", "d_model"),
                "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")}
        for name, keys in fill.items():
            value = next((model_config[k] for k in keys if isinstance(model_config.get(k), int)), None)
            if getattr(self, name) is None and value is not None:
                found[name] = value
        if self.num_transformer_submodules is None:
            found["num_transformer_submodules"] = 2 if self.task_type == SEQ_2_SEQ else 1
        return found


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's transformers config as peft reads it: the text part of a multimodal config, with
    transformers' attribute aliases (GPT-2's ``n_layer`` also as ``num_hidden_layers``) resolved."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("PromptLearningConfig", "token_dim", None, f"{type(model).__name__} has no transformers "
                          "config to read the shape fields from", "pass token_dim, num_layers and num_attention_heads")
    text = getattr(config, "text_config", None) or config
    out = dict(text.to_dict())
    for alias in getattr(text, "attribute_map", {}):
        value = getattr(text, alias, None)
        if isinstance(value, int):
            out.setdefault(alias, value)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): trained virtual-token embeddings before the input."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    INITS: ClassVar[tuple[str, ...]] = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
    PLACES: ClassVar[tuple[str, ...]] = ("input", "embeddings", "embeddings_after_first")
    HUB_ONLY: ClassVar[Mapping[str, Any]] = MappingProxyType({"insert_at": "input"})

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: Mapping[str, Any] | None = None
    insert_at: str = "input"
    """Where the virtual tokens go. "input" (peft): before the tokens as input embeddings, so the model adds
    its position embeddings and input norm to them and numbers the tokens after them. "embeddings"
    (AdapterHub's combine="prefix"): into the output of the model's embeddings module, in front, as they are;
    the tokens keep their positions. "embeddings_after_first" (AdapterHub's "prefix_after_bos"): the same,
    after the first token. The attention mask gets ones in front in every case."""

    def validate(self) -> None:
        super().validate()
        self.check(self.insert_at in self.PLACES, "insert_at", "unknown place for the virtual tokens",
                   f"use one of {self.PLACES}")
        self.check(self.prompt_tuning_init in self.INITS, "prompt_tuning_init", "unknown initialisation",
                   f"use one of {self.INITS}")
        text = self.prompt_tuning_init == "TEXT"
        self.check(not text or bool(self.tokenizer_name_or_path), "tokenizer_name_or_path",
                   "TEXT initialisation tokenizes prompt_tuning_init_text, so it needs a tokenizer",
                   "pass the tokenizer's folder (or the model's)")
        self.check(not text or bool(self.prompt_tuning_init_text), "prompt_tuning_init_text",
                   "TEXT initialisation needs the text", "pass e.g. prompt_tuning_init_text='Classify the sentiment:'")
        self.check(text or not self.tokenizer_kwargs, "tokenizer_kwargs", "it is only used by TEXT initialisation",
                   "drop it, or set prompt_tuning_init='TEXT'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021): virtual tokens computed by a trained encoder (MLP or LSTM)."""

    peft_type: ClassVar[str] = "P_TUNING"
    ENCODERS: ClassVar[tuple[str, ...]] = ("MLP", "LSTM")

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def loads_trainable(self) -> bool:
        return False  # the file holds the encoder's output, not the encoder (peft's layout)

    def validate(self) -> None:
        super().validate()
        self.check(self.encoder_reparameterization_type in self.ENCODERS, "encoder_reparameterization_type",
                   "unknown prompt encoder", f"use one of {self.ENCODERS}")
        self.check(self.encoder_hidden_size is None or is_positive_int(self.encoder_hidden_size), "encoder_hidden_size",
                   "it must be a positive integer or None (None: token_dim)", "pass e.g. 128")
        self.check(is_positive_int(self.encoder_num_layers), "encoder_num_layers", "it must be a positive integer",
                   "pass e.g. 2")
        self.check(isinstance(self.encoder_dropout, (int, float)) and 0 <= self.encoder_dropout < 1,
                   "encoder_dropout", "it must be in [0, 1)", "pass e.g. 0.1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes in every attention layer; with
    ``prefix_projection`` computed by an MLP (Li & Liang's reparameterization), without it the
    prefixes themselves are trained (deep prompts: P-tuning v2, Liu et al. 2022)."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    POSITIONS: ClassVar[tuple[str, ...]] = ("after_prefix", "from_zero")
    HUB_ONLY: ClassVar[Mapping[str, Any]] = MappingProxyType({"token_positions": "after_prefix"})
    INIT_ONLY: ClassVar[tuple[str, ...]] = ("prefix_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")
    """Fields that only choose the trained prefixes' start: the file holds the prefixes, so they stay out of it."""

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    token_positions: str = "after_prefix"
    """How the tokens are numbered: "after_prefix" (peft: the prefix counts as cached positions, so the first
    token's position is the prefix length) or "from_zero" (AdapterHub: the positions they have without it)."""
    prefix_init_text: str | None = None
    """deltatune's own (peft lacks it; Li & Liang's advice): start every layer's key/value prefix as the
    keys/values the base model caches for this text, its token ids repeated or cut to ``num_virtual_tokens``
    (peft's rule for prompt tuning's TEXT). Needs ``tokenizer_name_or_path``; not with ``prefix_projection``."""
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: Mapping[str, Any] | None = None

    def loads_trainable(self) -> bool:
        return not self.prefix_projection  # with the projection, the file holds the computed prefixes

    def trains_with_checkpointing(self) -> bool:
        return False  # recomputing a layer would add its prefix to the cache twice

    def validate(self) -> None:
        super().validate()
        self.check(self.encoder_hidden_size is None or is_positive_int(self.encoder_hidden_size), "encoder_hidden_size",
                   "it must be a positive integer or None (None: token_dim)", "pass e.g. 512")
        self.check(isinstance(self.prefix_projection, bool), "prefix_projection", "it must be a bool", "pass True or False")
        self.check(self.init_weights in (None, "zero"), "init_weights", "unknown initialisation",
                   "pass None (random) or 'zero'")
        self.check(self.token_positions in self.POSITIONS, "token_positions", "unknown numbering of the tokens",
                   f"use one of {self.POSITIONS}")
        text = self.prefix_init_text
        self.check(text is None or (isinstance(text, str) and bool(text)), "prefix_init_text",
                   "it must be a non-empty text or None", "pass e.g. prefix_init_text='Define the word:'")
        self.check(text is not None or not (self.tokenizer_name_or_path or self.tokenizer_kwargs),
                   "tokenizer_name_or_path", "a tokenizer is only used by prefix_init_text", "drop it")
        unset = text is None
        self.check(unset or not self.prefix_projection, "prefix_projection", "prefix_init_text sets the prefixes, but "
                   "with the projection an MLP computes them (no table of keys/values to set)", "pass False")
        self.check(unset or self.init_weights is None, "init_weights", "prefix_init_text initialises", "leave it unset")
        self.check(unset or self.task_type != SEQ_2_SEQ, "task_type", "prefix_init_text runs the model on the text "
                   "alone; an encoder-decoder's decoder has no cache of it", "drop prefix_init_text")
        self.check(unset or bool(self.tokenizer_name_or_path), "tokenizer_name_or_path",
                   "prefix_init_text is tokenized, so it needs a tokenizer", "pass the tokenizer's folder (or the model's)")

    def to_peft_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_peft_dict().items() if k not in self.INIT_ONLY}

    def shape_fields(self, model_config: Mapping[str, Any]) -> dict[str, int]:
        found = super().shape_fields(model_config)
        kv_heads = model_config.get("num_key_value_heads")
        if isinstance(kv_heads, int) and self.token_dim is None and self.num_attention_heads is None:
            heads, width = found["num_attention_heads"], found["token_dim"]
            head_dim = model_config.get("head_dim") or width // heads
            found.update(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
        return found


def complete(model: nn.Module, config: DeltaConfig, views: Mapping[str, object]) -> DeltaConfig:
    """A ``Finalize``: the shape fields left unset, read from the model's config (and
    ``encoder_hidden_size`` from ``token_dim``, as peft fills it)."""
    assert isinstance(config, PromptLearningConfig)
    found = config.shape_fields(model_config_dict(model))
    config = config.replace(**found) if found else config
    if getattr(config, "encoder_hidden_size", 0) is None:
        config = config.replace(encoder_hidden_size=config.token_dim)
    missing = [n for n in ("token_dim", "num_layers", "num_attention_heads") if getattr(config, n) is None]
    if missing:
        raise ConfigError(type(config).__name__, missing[0], None, f"the model's config does not say {missing}",
                          "pass them in the config")
    return config
