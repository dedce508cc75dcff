"""Checkpoints written atomically, and the state that makes a resumed run equal a straight one.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the adapter (peft format,
``adapter/``, to evaluate or ship), the adapters' tensors exactly as in memory
(``adapter_state.safetensors``, what resume restores), ``trainer_state.pt`` (optimizer, scheduler, random-generator states, data
position, early-stopping counters; read back with ``weights_only=True``, so nothing is
unpickled) and a readable ``checkpoint.json``. It is assembled in a hidden temporary folder
and renamed into place; only then does ``checkpoints/latest`` (itself replaced atomically)
point at it, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..adapters import adapter_names
from ..errors import TrainingError
from ..files import follow_umask
from ..io import adapter_tensors, save

STATE_FILE = "trainer_state.pt"
LIVE_FILE = "adapter_state.safetensors"
ADAPTER_DIR = "adapter"
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate wants nested tuples; a round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _assemble(staging: Path, model: nn.Module, trainer_state: dict[str, Any], info: dict[str, Any]) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save(model, staging / ADAPTER_DIR)
    save_file(live_tensors(model), staging / LIVE_FILE)
    torch.save(trainer_state, staging / STATE_FILE)
    (staging / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    follow_umask(staging)  # safetensors writes its files private (0600)
    _fsync_tree(staging)


def write_checkpoint(root: Path, model: nn.Module, trainer_state: dict[str, Any],
                     info: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step-<step>`` under ``root`` atomically and prune old ones.

    A write that fails (disk full, permissions) removes what it wrote and raises a TrainingError
    from the OSError: the previous checkpoint and ``latest`` are left exactly as they were.
    """
    final = root / f"step-{trainer_state['step']:07d}"
    staging = root / f".{final.name}.tmp"
    moved = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        _assemble(staging, model, trainer_state, info)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        moved = True
        _write_text_atomically(root / LATEST, final.name + "\n")
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if moved:  # ``latest`` still names the previous checkpoint; this one must not linger half-adopted
            shutil.rmtree(final, ignore_errors=True)
        (root / f".{LATEST}.tmp").unlink(missing_ok=True)
        if not isinstance(error, (OSError, SafetensorError)):  # safetensors reports a full disk as its own error
            raise
        raise TrainingError(_write_failed(root, final, error)) from error
    _prune(root, keep)
    return final


def _write_failed(root: Path, final: Path, error: BaseException) -> str:
    why = f"{error.strerror} (errno {error.errno})" if isinstance(error, OSError) and error.strerror else str(error)
    previous = latest_checkpoint(root) if (root / LATEST).is_file() else None
    kept = f"the last checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
    return (f"cannot write checkpoint {final}: {why}; the partial checkpoint was removed and {kept}. "
            "Free disk space (or fix permissions), then continue with --resume")


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    if not (folder / STATE_FILE).is_file():
        raise TrainingError(f"{pointer} names {folder.name}, which is missing or incomplete; "
                            f"delete {pointer} to start over, or point it at another step-* folder")
    return folder


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, loaded without unpickling arbitrary objects."""
    state: dict[str, Any] = torch.load(folder / STATE_FILE, weights_only=True)
    return state


def live_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter's tensors as they are in memory, keyed ``<adapter>/<file key>``.

    Not the saved-file form: a method may prune what it saves (a rank cut during training),
    while resuming needs the exact training state.
    """
    return {f"{name}/{key}": t.detach().to("cpu").contiguous().clone()
            for name in adapter_names(model) for key, t in adapter_tensors(model, name).items()}


def restore_adapters(model: nn.Module, folder: Path) -> None:
    """Copy a checkpoint's adapter tensors into the model's adapters of the same names, in place.

    In place, so the optimizer keeps pointing at the same parameters. Every key and shape is
    checked before anything is copied: on a mismatch the model is left as it was.
    """
    stored = load_file(folder / LIVE_FILE)
    live = {f"{name}/{key}": t for name in adapter_names(model) for key, t in adapter_tensors(model, name).items()}
    if set(live) != set(stored):
        extra, missing = sorted(set(stored) - set(live)), sorted(set(live) - set(stored))
        raise TrainingError(f"{folder}: the adapters do not fit this model (unexpected keys {extra[:3]}, "
                            f"missing keys {missing[:3]}); resume with the same model and adapter options")
    for key, tensor in live.items():
        if tensor.shape != stored[key].shape:
            raise TrainingError(f"{folder}: {key} has shape {tuple(stored[key].shape)} in the checkpoint but "
                                f"{tuple(tensor.shape)} in the model; resume with the same adapter options")
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(stored[key])
