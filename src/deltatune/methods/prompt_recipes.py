"""The prompt-space methods on the command line: ``--method prompt-tuning | p-tuning | prefix-tuning``
with ``--num-virtual-tokens`` and each method's initialisation or encoder options (a text initialisation
tokenizes with the base model's tokenizer)."""

from __future__ import annotations

from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import MethodOption, Recipe, RecipeInput, register_recipe
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig


def _shared(run: RecipeInput, method: str) -> dict[str, Any]:
    """The fields every prompt method takes from the run; targets make no sense for them."""
    if isinstance(run.target_modules, (str, tuple)):
        raise ConfigError("options", "target_modules", run.target_modules,
                          f"{method} adds virtual tokens to the input or the attention, not to named modules",
                          "drop --target-modules")
    return {"num_virtual_tokens": run.options["num_virtual_tokens"], **run.common}


def _hidden(run: RecipeInput) -> int | None:
    return run.options["encoder_hidden_size"] or None


def prompt_tuning(run: RecipeInput) -> DeltaConfig:
    init = run.options["prompt_init"].upper()
    text = run.options["prompt_init_text"] or None
    if text and init == "RANDOM":
        init = "TEXT"  # giving the text asks for it
    return PromptTuningConfig(prompt_tuning_init=init, prompt_tuning_init_text=text,
                              tokenizer_name_or_path=run.base_path if init == "TEXT" else None,
                              **_shared(run, "prompt tuning"))


def p_tuning(run: RecipeInput) -> DeltaConfig:
    return PromptEncoderConfig(encoder_reparameterization_type=run.options["prompt_encoder"].upper(),
                               encoder_hidden_size=_hidden(run), **_shared(run, "P-tuning"))


def prefix_tuning(run: RecipeInput) -> DeltaConfig:
    text = run.options["prefix_init_text"] or None
    return PrefixTuningConfig(prefix_projection=run.options["prefix_projection"], encoder_hidden_size=_hidden(run),
                              prefix_init_text=text, tokenizer_name_or_path=run.base_path if text else None,
                              **_shared(run, "prefix tuning"))


register_recipe(Recipe(
    "prompt-tuning", "prompt tuning (Lester et al. 2021): trained virtual tokens before the input", prompt_tuning,
    options=(MethodOption("num_virtual_tokens", "int", 20, "prompt methods: virtual tokens (prefix length)"),
             MethodOption("prompt_init", "str", "random", "prompt tuning: random, text or sample_vocab initialisation"),
             MethodOption("prompt_init_text", "str", "", "prompt tuning: text whose token embeddings start the "
                                                         "virtual tokens (repeated or cut to their number)"))))
register_recipe(Recipe(
    "p-tuning", "P-tuning (Liu et al. 2021): virtual tokens computed by a trained MLP or LSTM encoder", p_tuning,
    options=(MethodOption("prompt_encoder", "str", "mlp", "P-tuning: the encoder, mlp or lstm"),
             MethodOption("encoder_hidden_size", "int", 0, "P-tuning / prefix projection: encoder width; 0 = the "
                                                            "model's hidden size (prefixes on a grouped-query model: "
                                                            "the key/value width, as peft)"))))
register_recipe(Recipe(
    "prefix-tuning", "prefix tuning (Li & Liang 2021): trained key/value prefixes in every attention layer; "
    "without --prefix-projection, P-tuning v2's deep prompts", prefix_tuning,
    options=(MethodOption("prefix_projection", "bool", False, "prefix tuning: compute the prefixes with an MLP "
                                                              "(Li & Liang's reparameterization)"),
             MethodOption("prefix_init_text", "str", "", "prefix tuning without projection: text whose keys/values "
                                                         "in the base model start every layer's prefix (its tokens "
                                                         "repeated or cut to the prefix length); '' = random"))))
