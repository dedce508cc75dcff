"""``deltatune train --method fusion --fuse NAME=FOLDER NAME=FOLDER ...``: AdapterFusion trained over
bottleneck adapters saved by earlier runs, which are loaded frozen first (the recipe's ``loads``);
the fusion and a fresh copy of the task head train (``FusionConfig.active_form`` makes the run
compute with ``Fuse`` over the members, and the head copy of the fusion serves it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError, DeltatuneError
from ..io import CONFIG_NAME
from ..registry import MethodOption, Recipe, RecipeInput, register_recipe
from ..state import check_name
from .fusion import FusionConfig

RUN_ADAPTER = "adapter"
"""The folder a ``deltatune train`` run saves its adapter to, inside its output folder."""
OWN_NAME = "default"
"""The name a run gives the adapter it trains, so no member may take it."""
FIX = "pass --fuse NAME=FOLDER NAME=FOLDER, each FOLDER an adapter folder or the --output-dir of a bottleneck run"


def _folder(value: str) -> Path:
    """The adapter folder ``value`` names: itself, or the adapter a run folder holds."""
    path = Path(value)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / RUN_ADAPTER / CONFIG_NAME).is_file():
        return path / RUN_ADAPTER
    raise ConfigError("options", "fuse", value, f"{path} holds no {CONFIG_NAME} (nor {RUN_ADAPTER}/{CONFIG_NAME})", FIX)


def _default_name(folder: Path) -> str:
    """A run's adapter is named after its run folder; any other folder after itself."""
    return folder.parent.name if folder.name == RUN_ADAPTER else folder.name


def members(options: Mapping[str, Any]) -> dict[str, Path]:
    """The ``--fuse`` adapters by name, in the order given (the fusion's member order)."""
    out: dict[str, Path] = {}
    for item in options["fuse"]:
        name, sep, value = item.partition("=")
        if not sep:
            name, value = "", item
        folder = _folder(value)
        name = name if sep else _default_name(folder)
        try:
            check_name(name)
        except DeltatuneError as error:
            raise ConfigError("options", "fuse", item, str(error), "prefix the folder with a name: NAME=FOLDER") from None
        if name == OWN_NAME or name in out:
            why = "taken by another member" if name in out else "the name the fusion itself gets"
            raise ConfigError("options", "fuse", item, f"the name {name!r} is {why}", "give each member its own NAME=FOLDER")
        out[name] = folder
    if len(out) < 2:
        raise ConfigError("options", "fuse", list(options["fuse"]), "a fusion needs two or more trained adapters", FIX)
    return out


def build(run: RecipeInput) -> DeltaConfig:
    return FusionConfig(adapter_names=tuple(members(run.options)), **run.common)


FUSE = MethodOption("fuse", "tuple[str, ...]", (),
                    "fusion: the trained bottleneck adapters to fuse, as NAME=FOLDER (an adapter folder, or a run's "
                    "--output-dir; NAME defaults to the run folder's name)")
register_recipe(Recipe("fusion", "AdapterFusion (Pfeiffer et al. 2021) over bottleneck adapters trained before (--fuse); "
                       "they stay frozen, the fusion and a new task head train", build, options=(FUSE,), loads=members))
