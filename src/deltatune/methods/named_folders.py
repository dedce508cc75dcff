"""``NAME=FOLDER`` command-line items that name saved adapter folders: the parsing every recipe
built on earlier runs shares (``--fuse a=RUN_A b=RUN_B``, ...), with the same errors for all.

A FOLDER is an adapter folder (it holds ``adapter_config.json``) or the ``--output-dir`` of a
``deltatune train`` run (its adapter is in ``adapter/``). NAME may be left out (``FOLDER``
alone): a run's adapter is then named after its run folder, any other folder after itself.
Names must be adapter names (``state.check_name``): they key adapters and become folder names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError, DeltatuneError
from ..io import CONFIG_NAME
from ..state import check_name

RUN_ADAPTER = "adapter"
"""The folder a ``deltatune train`` run saves its adapter to, inside its output folder."""

Check = Callable[[str, Path], object]
"""(name, adapter folder) -> None, raising a DeltatuneError that says what the folder holds wrong."""


def adapter_in(path: Path) -> Path | None:
    """The adapter folder ``path`` names: itself, or the adapter a run folder holds; None if neither."""
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / RUN_ADAPTER / CONFIG_NAME).is_file():
        return path / RUN_ADAPTER
    return None


def default_name(folder: Path) -> str:
    """A run's adapter is named after its run folder; any other folder after itself."""
    return folder.parent.name if folder.name == RUN_ADAPTER else folder.name


def _split(item: str) -> tuple[str | None, str]:
    """``NAME=FOLDER`` -> (NAME, FOLDER); a bare ``FOLDER`` -> (None, FOLDER)."""
    name, sep, value = item.partition("=")
    return (name, value) if sep else (None, item)


def _named(option: str, item: str, fix: str, check: Check | None) -> tuple[str, Path]:
    """One item's (name, adapter folder), the folder resolved so the name works from any directory."""
    given, value = _split(item)
    folder = adapter_in(Path(value))
    if folder is None:
        raise ConfigError("options", option, item, f"{value} holds no {CONFIG_NAME} (nor "
                          f"{RUN_ADAPTER}/{CONFIG_NAME})", fix)
    name = default_name(folder.resolve()) if given is None else given
    try:
        check_name(name)
    except DeltatuneError as error:
        raise ConfigError("options", option, item, str(error), "prefix the folder with a name: NAME=FOLDER") from None
    if check is not None:
        try:
            check(name, folder)
        except DeltatuneError as error:
            raise ConfigError("options", option, item, str(error), fix) from None
    return name, folder.resolve()


def named_adapter_folders(option: str, items: Sequence[str], purpose: str, fix: str, check: Check | None = None,
                          reserved: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The adapter folders ``items`` (option ``option``'s ``NAME=FOLDER`` values) name, by name, in
    the order given; at least two, for ``purpose`` (e.g. "a fusion"). ``check`` vets each folder's
    adapter; ``reserved``: names no item may take, each with why (e.g. the name of the adapter the
    run trains). Errors are ConfigErrors naming the option, the item, what is wrong and ``fix``."""
    out: dict[str, Path] = {}
    for item in items:
        name, folder = _named(option, item, fix, check)
        if name in out or name in (reserved or {}):
            why = "taken by another folder of this option" if name in out else (reserved or {})[name]
            raise ConfigError("options", option, item, f"the name {name!r} is {why}",
                              "give each folder its own name: NAME=FOLDER")
        out[name] = folder
    if len(out) < 2:
        raise ConfigError("options", option, list(items), f"{purpose} needs two or more adapter folders, "
                          f"{len(out)} given", fix)
    return out
