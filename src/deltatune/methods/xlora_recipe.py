"""``deltatune train --method xlora --xlora-experts NAME=FOLDER NAME=FOLDER ...``: X-LoRA's classifier
trained over LoRA adapters saved by earlier runs (the experts, frozen).

Unlike AdapterFusion's members, the experts are not loaded as adapters of their own: X-LoRA reads
their factors from the folders its config names (``XLoraConfig.adapters``), when the run attaches
it and again whenever the run folder is rebuilt (``deltatune eval`` / ``predict``). The config
holds each folder as an absolute path, so those commands work from any directory as long as the
expert folders stay where they were. A task head (a classification task's) trains as a new copy
with the classifier, as ``modules_to_save``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError, DeltatuneError
from ..io import CONFIG_NAME, read_config
from ..registry import MethodOption, Recipe, RecipeInput, register_recipe
from .lora_config import LoraConfig
from .xlora_config import XLoraConfig

RUN_ADAPTER = "adapter"
"""The folder a ``deltatune train`` run saves its adapter to, inside its output folder."""
OPTION = "xlora_experts"
FIX = ("pass --xlora-experts NAME=FOLDER NAME=FOLDER, each FOLDER a LoRA adapter folder or the --output-dir of a "
       "`deltatune train --method lora` run")


def _folder(item: str, value: str) -> Path:
    """The LoRA adapter folder ``value`` names (itself, or the adapter a run folder holds), checked."""
    path = Path(value)
    folder = path / RUN_ADAPTER if not (path / CONFIG_NAME).is_file() and (path / RUN_ADAPTER / CONFIG_NAME).is_file() \
        else path
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError("options", OPTION, item, f"{path} holds no {CONFIG_NAME} (nor {RUN_ADAPTER}/{CONFIG_NAME})",
                          FIX)
    try:
        config = read_config(folder)
    except DeltatuneError as error:
        raise ConfigError("options", OPTION, item, f"its adapter cannot be read ({error})", FIX) from None
    plain = isinstance(config, LoraConfig) and not (config.use_dora or config.use_qalora or config.rank_pattern
                                                    or config.alpha_pattern)
    if not plain:
        raise ConfigError("options", OPTION, item, f"{folder} holds a {config.peft_type} adapter that is not plain "
                          "LoRA (X-LoRA's experts are LoRA without DoRA, QA-LoRA, rank_pattern or alpha_pattern, as "
                          "in peft)", FIX)
    return folder.resolve()


def experts(options: Mapping[str, Any]) -> dict[str, Path]:
    """The ``--xlora-experts`` folders by name, in the order given (the classifier's expert order)."""
    out: dict[str, Path] = {}
    for item in options[OPTION]:
        name, sep, value = item.partition("=")
        if not sep:
            name, value = "", item
        folder = _folder(item, value)
        name = name if sep else (folder.parent.name if folder.name == RUN_ADAPTER else folder.name)
        if not name or name in out:
            why = "taken by another expert" if name else "empty"
            raise ConfigError("options", OPTION, item, f"the expert name {name!r} is {why}",
                              "give each expert its own NAME=FOLDER")
        out[name] = folder
    if len(out) < 2:
        raise ConfigError("options", OPTION, list(options[OPTION]), "a mixture needs two or more LoRA experts", FIX)
    return out


def build(run: RecipeInput) -> DeltaConfig:
    options = run.options
    top_k = options["xlora_top_k"]
    if top_k < 0:
        raise ConfigError("options", "xlora_top_k", top_k, "must be >= 0", "pass 0 (every expert) or e.g. 1")
    return XLoraConfig(adapters={name: str(folder) for name, folder in experts(options).items()},
                       xlora_depth=options["xlora_depth"], xlora_size=options["xlora_size"],
                       layerwise_scalings=options["xlora_layerwise"], top_k_lora=top_k or None, **run.common)


OPTIONS = (
    MethodOption(OPTION, "tuple[str, ...]", (), "X-LoRA: the trained LoRA experts, as NAME=FOLDER (an adapter folder, "
                 "or a run's --output-dir; NAME defaults to the run folder's name)"),
    MethodOption("xlora_depth", "int", 1, "X-LoRA: linear layers in the scaling classifier"),
    MethodOption("xlora_size", "int", 2048, "X-LoRA: the classifier's hidden width (with --xlora-depth > 1)"),
    MethodOption("xlora_layerwise", "bool", False, "X-LoRA: one set of scalings per adapted layer (peft's "
                 "layerwise_scalings), not one for all layers"),
    MethodOption("xlora_top_k", "int", 0, "X-LoRA: keep each token's k largest expert scalings (0 = all)"),
)
register_recipe(Recipe("xlora", "X-LoRA (Buehler & Buehler 2024): a classifier over hidden states mixes frozen LoRA "
                       "experts trained before (--xlora-experts) per token; the classifier and a new task head train",
                       build, options=OPTIONS))
