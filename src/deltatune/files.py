"""Replace several files in one folder so that a reader sees either all old or all new ones.

POSIX renames one path at a time, so two renames can be interrupted in between. A save here
therefore has a commit point: every new file is first written whole (and synced) under a hidden
temporary name, then a journal naming the renames is itself written by one rename. A kill before
the journal exists leaves the old files untouched (the temporaries are deleted by the next call
on the folder); a kill after it is finished by the next call (``recover``), which performs the
renames the journal lists. The old config is moved aside before the new files move in, so no
reader ever pairs an old file with a new one: in the short window between the renames the folder
has no config at all (a reader fails loudly; deltatune's load finishes the save first).

Files are created with ``open`` and so follow the process umask, like other libraries' files.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

JOURNAL = ".deltatune-save.json"
TEMP_MARK = ".deltatune-tmp-"
"""Every temporary file of a save carries this in its name, so leftovers are recognisable."""


def _sync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _sync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _temp_name(name: str, save_id: str, kind: str) -> str:
    return f".{name}{TEMP_MARK}{save_id}.{kind}"


def recover(folder: Path) -> None:
    """Finish a save that was killed after its commit point, and delete leftovers of one killed before.

    Safe to call on any folder, any number of times; does nothing on a folder without leftovers.
    """
    journal = folder / JOURNAL
    if journal.is_file():
        try:
            plan = json.loads(journal.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            plan = {}  # a journal is written whole before its rename: a broken one was never committed
        _finish(folder, plan.get("moves", {}), plan.get("aside", []))
        journal.unlink(missing_ok=True)
        _sync_folder(folder)
    if folder.is_dir():
        for leftover in folder.iterdir():
            if TEMP_MARK in leftover.name and leftover.is_file():
                leftover.unlink(missing_ok=True)


def _finish(folder: Path, moves: Mapping[str, str], aside: list[list[str]]) -> None:
    """Move old files aside, then every staged file into place (skipping what is already done)."""
    staged_for = {final: staged for staged, final in moves.items()}
    for final, parked in aside:  # only while its replacement is still waiting to move in
        if (folder / staged_for[final]).exists() and (folder / final).exists():
            os.replace(folder / final, folder / parked)
    for staged, final in moves.items():
        if (folder / staged).exists():
            os.replace(folder / staged, folder / final)
    for _, parked in aside:
        (folder / parked).unlink(missing_ok=True)


def replace_files(folder: Path, writers: Mapping[str, Callable[[Path], object]], first: str) -> None:
    """Write every file of ``writers`` (name -> ``write(path)``) into ``folder``, all or nothing.

    ``first`` is the file whose absence marks an incomplete folder (an adapter's config): it is
    moved aside before the others move in and is the last to arrive. A failure while writing
    leaves the old files as they were and no temporary file behind.
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder)
    save_id = uuid.uuid4().hex[:12]
    staged = {name: folder / _temp_name(name, save_id, "new") for name in writers}
    try:
        for name, write in writers.items():
            _write_with_umask(staged[name], write)
        order = [n for n in writers if n != first] + [first]
        moves = {staged[n].name: n for n in order}
        aside = [[first, _temp_name(first, save_id, "old")]]
        _write_journal(folder, {"moves": moves, "aside": aside}, save_id)
    except BaseException:
        for path in staged.values():
            path.unlink(missing_ok=True)
        if created:  # a failed first save leaves no empty folder behind
            folder.rmdir()
        raise
    _finish(folder, moves, aside)  # past the commit point: a kill here is finished by `recover`
    (folder / JOURNAL).unlink(missing_ok=True)
    _sync_folder(folder)


def _new_file_mode(path: Path) -> int:
    """Create ``path`` empty, as ``open`` creates files (the umask applies), and return its mode."""
    with open(path, "xb"):
        pass
    return path.stat().st_mode & 0o777


def _write_with_umask(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(path)`` so that the file ends with the mode the umask gives new files.

    Some writers (safetensors') create their file private (0600); the file is created here first,
    by ``open``, and its mode put back after the writer is done.
    """
    mode = _new_file_mode(path)
    write(path)
    if path.stat().st_mode & 0o777 != mode:
        os.chmod(path, mode)
    _sync_file(path)


def _write_journal(folder: Path, plan: dict[str, object], save_id: str) -> None:
    """The commit point: the journal appears whole, by one rename, or not at all."""
    tmp = folder / _temp_name(JOURNAL, save_id, "new")
    tmp.write_text(json.dumps(plan), encoding="utf-8")
    _sync_file(tmp)
    os.replace(tmp, folder / JOURNAL)
    _sync_folder(folder)


def follow_umask(tree: Path) -> None:
    """Give every file under ``tree`` the mode a new file gets from the umask (writers such as
    safetensors' create theirs private, 0600); used on checkpoints and merged-model folders."""
    probe = tree / f"{TEMP_MARK}{uuid.uuid4().hex[:12]}.probe"
    mode = _new_file_mode(probe)
    probe.unlink()
    for path in [tree, *tree.rglob("*")]:
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)
