"""``deltatune train --method fusion --fuse NAME=FOLDER NAME=FOLDER ...``: AdapterFusion trained over
bottleneck adapters saved by earlier runs, which are loaded frozen first (the recipe's ``loads``);
the fusion and a fresh copy of the task head train (``FusionConfig.active_form`` makes the run
compute with ``Fuse`` over the members, and the head copy of the fusion serves it). ``--fuse`` is
read as every recipe over saved adapters reads its folders (``named_folders``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import DeltaConfig
from ..registry import MethodOption, Recipe, RecipeInput, register_recipe
from .fusion import FusionConfig
from .named_folders import named_adapter_folders

OWN_NAME = "default"
"""The name a run gives the adapter it trains, so no member may take it."""
FIX = "pass --fuse NAME=FOLDER NAME=FOLDER, each FOLDER an adapter folder or the --output-dir of a bottleneck run"


def members(options: Mapping[str, Any]) -> dict[str, Path]:
    """The ``--fuse`` adapters by name, in the order given (the fusion's member order)."""
    return named_adapter_folders("fuse", options["fuse"], "a fusion", FIX,
                                 reserved={OWN_NAME: "the name the fusion itself gets"})


def build(run: RecipeInput) -> DeltaConfig:
    return FusionConfig(adapter_names=tuple(members(run.options)), **run.common)


FUSE = MethodOption("fuse", "tuple[str, ...]", (),
                    "fusion: the trained bottleneck adapters to fuse, as NAME=FOLDER (an adapter folder, or a run's "
                    "--output-dir; NAME defaults to the run folder's name)")
register_recipe(Recipe("fusion", "AdapterFusion (Pfeiffer et al. 2021) over bottleneck adapters trained before (--fuse); "
                       "they stay frozen, the fusion and a new task head train", build, options=(FUSE,), loads=members))
