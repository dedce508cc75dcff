"""One training run per output folder: an OS file lock held for the whole run.

Two runs writing one folder would delete each other's checkpoints and overwrite each other's
adapter. A run therefore takes an exclusive, non-blocking lock on ``<output_dir>/.deltatune.lock``
before it touches anything in the folder, and a second run refuses at once. The lock is the
kernel's (``flock`` on POSIX, ``msvcrt.locking`` on Windows), so it goes away with the process:
a run killed with ``kill -9`` leaves no stale lock, at most the empty lock file, which the next
run reuses. Where the system cannot lock, the run goes on with a warning.

The lock is re-entrant within a process: ``deltatune train`` holds it from before reading the data
to the end, and :meth:`Trainer.fit` inside takes it again without blocking itself.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError

LOCK_FILE = ".deltatune.lock"

_held: dict[Path, int] = {}
"""Folders this process holds, with how many nested holders; the OS lock is taken by the first."""

if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool | None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    try:
        import fcntl
    except ImportError:  # a POSIX-like system without fcntl (WASI): no locking at all
        fcntl = None  # type: ignore[assignment]

    def _try_lock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: this system or filesystem cannot lock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # e.g. ENOLCK on a filesystem without locks
            return None
        return True

    def _unlock(fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _refuse(folder: Path, why: str, fix: str) -> ConfigError:
    return ConfigError("TrainConfig", "output_dir", str(folder), why, fix)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (what mkdir -p would create)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _make_folder(folder: Path) -> Path | None:
    """Create ``folder`` if needed; returns the outermost folder created (to remove again on failure)."""
    if folder.exists() and not folder.is_dir():
        raise _refuse(folder, "is an existing file, not a folder", "pass a folder for the run: a new path, or an "
                      "earlier run's folder")
    created = _first_missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _refuse(folder, f"cannot be created ({error.strerror or error})",
                      "pass a folder path that you can write to and whose parents are folders") from None
    return created


def _remove_created(folder: Path, created: Path | None) -> None:
    """Remove the folders :func:`_make_folder` created, if they are still empty (a failed run leaves nothing)."""
    if created is None:
        return
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:  # not empty (the run wrote something) or already gone
            return
        if path == created:
            return


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _lock(folder: Path) -> int | None:
    """An open descriptor of the locked lock file; None where the system cannot lock."""
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _try_lock(fd)
        if locked is None:
            os.close(fd)
            warnings.warn(f"{folder}: this system cannot lock {path}; make sure no other run uses this folder",
                          stacklevel=4)
            return None
        if not locked:
            os.close(fd)
            raise _refuse(folder, f"another training run ({_holder(path)}) is using it: it holds {path}",
                          "wait for that run to finish, or pass another --output-dir")
        # A run that was just releasing the lock deletes the file; then we hold a lock on a file that
        # no longer has this name, and must lock the new one instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release(folder: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        (folder / LOCK_FILE).unlink()  # while still locked, so no other run holds a lock on this file
    except OSError:  # Windows cannot remove an open file; the next run reuses it
        pass
    try:
        _unlock(fd)
    finally:
        os.close(fd)


@contextmanager
def own_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for one training run; refuse with a ConfigError if another run holds it.

    A folder this call created is removed again on exit if the run left it empty.
    """
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    created = _make_folder(folder)
    try:
        fd = _lock(folder)
    except BaseException:
        _remove_created(folder, created)
        raise
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        _release(folder, fd)
        _remove_created(folder, created)
