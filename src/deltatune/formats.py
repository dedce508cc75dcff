"""Adapter folder formats besides peft's: how ``dt.load`` recognises one and ``dt.save`` writes one.

peft's layout is ``io``'s own. A method with a second, foreign layout (e.g. another library's files)
registers a ``FolderFormat`` here when its module is imported; ``io`` only asks this registry, so it
stays free of method names: ``load`` hands a folder to the format that claims it, ``save(...,
format=name)`` writes through the named one. A format reads into an ``AttachPlan`` (every check done,
the model untouched) and ``io`` applies it, so a failed load leaves the model as it was; it writes
through ``files.replace_files``, so each folder is replaced all or nothing. Names no method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import AdapterFileError
from .files import replace_files
from .inject import AttachPlan

PEFT = "peft"
"""The name of peft's layout, io's own and the default."""

Writer = Callable[[Path], object]


@dataclass(frozen=True)
class FolderFiles:
    """What one adapter's folder will hold: file name -> a function writing it to a given path."""

    writers: Mapping[str, Writer]
    first: str
    """The file whose absence marks an incomplete folder (``replace_files`` moves it in last)."""


@dataclass(frozen=True)
class FolderFormat:
    """A folder layout ``dt.load`` reads and ``dt.save(..., format=name)`` writes."""

    name: str
    claims: Callable[[Path], bool]
    """Whether a folder is in this layout (cheap; a damaged folder is claimed and then refused by ``read``)."""
    read: Callable[[nn.Module, Path, str, bool], AttachPlan]
    """(model, folder, adapter name, trainable) -> the attach plan, filled from the folder; raises
    AdapterFileError on anything that does not fit, and never changes the model."""
    files: Callable[[nn.Module, str, Path], FolderFiles]
    """(model, adapter name, destination folder) -> its files; raises before anything is written."""
    folder: Callable[[Path, str, Sequence[str]], Path]
    """(root, adapter name, every name saved) -> the adapter's folder."""


_FORMATS: dict[str, FolderFormat] = {}


def register_format(folder_format: FolderFormat) -> FolderFormat:
    """Add a layout; its name must be new (and not peft's)."""
    if folder_format.name == PEFT or folder_format.name in _FORMATS:
        raise AdapterFileError(f"a folder format named {folder_format.name!r} already exists")
    _FORMATS[folder_format.name] = folder_format
    return folder_format


def format_named(name: str) -> FolderFormat:
    """The registered layout called ``name``; a clear error listing the choices otherwise."""
    if name not in _FORMATS:
        raise AdapterFileError(f"unknown adapter folder format {name!r}; formats: {[PEFT, *sorted(_FORMATS)]}. "
                               f"Fix: pass format={PEFT!r} (the default) or one of the others.")
    return _FORMATS[name]


def claiming(folder: Path) -> FolderFormat | None:
    """The registered layout that recognises ``folder``, or None (then it is read as peft's)."""
    return next((f for f in _FORMATS.values() if f.claims(folder)), None)


def save_folders(folder_format: FolderFormat, model: nn.Module, root: Path, names: Sequence[str]) -> None:
    """Write adapters ``names`` in ``folder_format``: every adapter is checked and its files prepared before
    the first folder is written; each folder is then replaced all or nothing."""
    prepared = []
    for name in names:
        folder = folder_format.folder(root, name, names)
        prepared.append((folder, folder_format.files(model, name, folder)))
    for folder, files in prepared:
        replace_files(folder, files.writers, first=files.first)
