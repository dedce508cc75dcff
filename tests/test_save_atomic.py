"""A save killed at any moment leaves the old adapter or the new one, whole; files follow the umask.

The kill is real: a child process runs ``dt.save`` and calls ``os._exit`` at its k-th file
operation (a rename, a delete, or halfway through writing the weights), for every k until a save
completes. Nothing is cleaned up by exception handlers, as with ``kill -9``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.files import JOURNAL, TEMP_MARK

CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    from torch import nn
    import deltatune as dt
    import deltatune.files as files
    import deltatune.io as dtio

    folder, kill_at, rank = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    torch.manual_seed(rank)
    dt.attach(model, dt.LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=["0", "1"], init_lora_weights=False))
    events = [0]

    def tick():
        events[0] += 1
        if events[0] == kill_at:
            os._exit(9)

    real_replace, real_unlink, real_save_file = os.replace, Path.unlink, dtio.save_file

    def replace(src, dst):
        tick()
        real_replace(src, dst)

    def unlink(self, missing_ok=False):
        tick()
        real_unlink(self, missing_ok=missing_ok)

    def save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        tick()  # the whole file is written but not yet synced: a kill now leaves it staged

    files.os.replace = replace
    Path.unlink = unlink
    dtio.save_file = save_file
    dt.save(model, folder)
    print("completed", events[0])
""")


def model_with(rank: int) -> nn.Module:
    """The model the child builds for ``rank``: one base for every rank, the adapter seeded by rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    torch.manual_seed(rank)
    dt.attach(model, dt.LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=["0", "1"], init_lora_weights=False))
    return model


def run_child(folder: Path, kill_at: int, rank: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(folder), str(kill_at), str(rank)],
                          capture_output=True, text=True, timeout=120)


def outputs_after_load(folder: Path) -> torch.Tensor:
    """Load the folder into a fresh copy of the children's base."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    dt.load(base, folder)
    with torch.no_grad():
        return base(torch.ones(3, 16))


def test_save_killed_at_every_step_leaves_old_or_new_whole(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    first = run_child(folder, 0, 2)
    assert first.returncode == 0 and "completed" in first.stdout, first.stderr
    steps = int(first.stdout.split()[-1])
    assert steps >= 5  # weights write, journal, the old config aside, two renames, the journal removed
    with torch.no_grad():
        old, new = model_with(2)(torch.ones(3, 16)), model_with(6)(torch.ones(3, 16))
    outcomes = []
    for kill_at in range(1, steps + 1):
        trial = tmp_path / f"trial-{kill_at}"
        shutil.copytree(folder, trial)
        killed = run_child(trial, kill_at, 6)
        assert killed.returncode == 9, (kill_at, killed.stderr)
        config = trial / "adapter_config.json"
        if config.is_file():  # whatever a reader sees before any recovery is never a mixed pair
            r = json.loads(config.read_text())["r"]
            shapes = {t.shape[0] for k, t in dt.io.read_tensors(trial).items() if "lora_A" in k}
            assert shapes == {r}, (kill_at, r, shapes)
        got = outputs_after_load(trial)
        is_old, is_new = torch.equal(got, old), torch.equal(got, new)
        assert is_old or is_new, kill_at
        outcomes.append("old" if is_old else "new")
        left = sorted(p.name for p in trial.iterdir())
        assert left == ["README.md", "adapter_config.json", "adapter_model.safetensors"], (kill_at, left)
    assert outcomes[0] == "old" and outcomes[-1] == "new"  # both sides of the commit point were hit


def test_leftovers_of_killed_saves_do_not_pile_up(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    assert run_child(folder, 0, 2).returncode == 0
    for _ in range(3):  # each killed with its weights staged (or while deleting the last one's)
        assert run_child(folder, 1, 6).returncode == 9
        assert len([p for p in folder.iterdir() if TEMP_MARK in p.name]) == 1
    assert run_child(folder, 0, 6).returncode == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_interrupted_save_is_finished_by_the_next_load(tmp_path: Path) -> None:
    """Killed right after the commit point (the journal written): the next load completes it."""
    folder = tmp_path / "adapter"
    assert run_child(folder, 0, 2).returncode == 0
    assert run_child(folder, 4, 6).returncode == 9  # after the journal and the config moved aside
    assert (folder / JOURNAL).is_file() and not (folder / "adapter_config.json").exists()
    with torch.no_grad():
        assert torch.equal(outputs_after_load(folder), model_with(6)(torch.ones(3, 16)))
    assert not (folder / JOURNAL).exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = model_with(2)
    old = os.umask(umask)
    try:
        dt.save(model, tmp_path / "out")
        dt.save(model, tmp_path / "out")  # replacing keeps the mode too
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_save_onto_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(dt.AdapterFileError, match="is a file"):
        dt.save(model_with(2), target)
    assert target.read_text() == "keep me"
