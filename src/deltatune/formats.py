"""Adapter folder formats besides peft's: how ``dt.load`` recognises one and ``dt.save`` writes one.

peft's layout is ``io``'s own. A method with a second, foreign layout (e.g. another library's files)
registers a ``FolderFormat`` here when its module is imported; ``io`` only asks this registry, so it
stays free of method names: ``load`` hands a folder to the format that claims it, ``save(...,
format=name)`` writes through the named one. A format reads into an ``AttachPlan`` (every check done,
the model untouched) and ``io`` applies it, so a failed load leaves the model as it was; it writes
through ``files.replace_files``, so each folder is replaced all or nothing.

One library's folders may hold several methods, each read and written by its own module: one registers
the layout, the others register parts of it under the same name (``handles`` set: which adapters a part
writes). ``load`` asks the parts' ``claims`` before the layouts', and ``save`` hands each adapter to the
first part that handles it, else to the layout. Names no method.
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
    handles: Callable[[nn.Module, str], bool] | None = None
    """Set for a part of a layout registered under the same name: (model, adapter name) -> whether this part
    writes that adapter. Its ``claims`` must recognise only its own folders: it is asked first."""


_FORMATS: dict[str, FolderFormat] = {}
_PARTS: dict[str, list[FolderFormat]] = {}


def register_format(folder_format: FolderFormat) -> FolderFormat:
    """Add a layout (its name must be new, and not peft's), or a part of one (``handles`` set)."""
    name = folder_format.name
    if name == PEFT or (folder_format.handles is None and name in _FORMATS):
        raise AdapterFileError(f"a folder format named {name!r} already exists")
    if folder_format.handles is None:
        _FORMATS[name] = folder_format
    else:
        _PARTS.setdefault(name, []).append(folder_format)
    return folder_format


def format_named(name: str) -> FolderFormat:
    """The registered layout called ``name``; a clear error listing the choices otherwise."""
    if name not in _FORMATS and name not in _PARTS:
        known = sorted({*_FORMATS, *_PARTS})
        raise AdapterFileError(f"unknown adapter folder format {name!r}; formats: {[PEFT, *known]}. "
                               f"Fix: pass format={PEFT!r} (the default) or one of the others.")
    return _FORMATS[name] if name in _FORMATS else _PARTS[name][0]


def claiming(folder: Path) -> FolderFormat | None:
    """The registered layout (or part) that recognises ``folder``, or None (then it is read as peft's). Parts
    come first: a layout may claim every folder of its library, a part only its own method's."""
    candidates = [*(p for parts in _PARTS.values() for p in parts), *_FORMATS.values()]
    return next((f for f in candidates if f.claims(folder)), None)


def _writer(folder_format: FolderFormat, model: nn.Module, name: str) -> FolderFormat:
    """The part of ``folder_format``'s layout that writes adapter ``name``, else the layout itself (whose
    ``files`` refuses what it cannot write)."""
    parts = _PARTS.get(folder_format.name, [])
    chosen = next((p for p in parts if p.handles is not None and p.handles(model, name)), None)
    return chosen or _FORMATS.get(folder_format.name, folder_format)


def save_folders(folder_format: FolderFormat, model: nn.Module, root: Path, names: Sequence[str]) -> None:
    """Write adapters ``names`` in ``folder_format``: every adapter is checked and its files prepared before
    the first folder is written; each folder is then replaced all or nothing."""
    prepared = []
    for name in names:
        layout = _writer(folder_format, model, name)
        folder = layout.folder(root, name, names)
        prepared.append((folder, layout.files(model, name, folder)))
    for folder, files in prepared:
        replace_files(folder, files.writers, first=files.first)
