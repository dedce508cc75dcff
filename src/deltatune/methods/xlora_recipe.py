"""``deltatune train --method xlora --xlora-experts NAME=FOLDER NAME=FOLDER ...``: X-LoRA's classifier
trained over LoRA adapters saved by earlier runs (the experts, frozen).

Unlike AdapterFusion's members, the experts are not loaded as adapters of their own: X-LoRA reads
their factors from the folders its config names (``XLoraConfig.adapters``). ``--xlora-experts`` is
read as every recipe over saved adapters reads its folders (``named_folders``), and each expert is
vetted by the check the attach runs too (``xlora_parts.read_expert``), so a bad one stops the run
before its folder is touched. The run's saved adapter carries copies of the experts
(``xlora_config``), so the run folder rebuilds (``deltatune eval`` / ``predict``) from anywhere,
also once moved or copied to another machine, without the expert folders it was trained from.
A task head (a classification task's) trains as a new copy with the classifier, as ``modules_to_save``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import MethodOption, Recipe, RecipeInput, register_recipe
from .named_folders import named_adapter_folders
from .xlora_config import XLoraConfig
from .xlora_parts import read_expert

OPTION = "xlora_experts"
FIX = ("pass --xlora-experts NAME=FOLDER NAME=FOLDER, each FOLDER a LoRA adapter folder or the --output-dir of a "
       "`deltatune train --method lora` run")


def experts(options: Mapping[str, Any]) -> dict[str, Path]:
    """The ``--xlora-experts`` folders by name, in the order given (the classifier's expert order)."""
    return named_adapter_folders(OPTION, options[OPTION], "an X-LoRA mixture", FIX, check=read_expert)


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
