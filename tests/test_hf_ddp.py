"""A deltatune-adapted model in ``transformers.Trainer`` under ``accelerate launch`` / ``torchrun``: 2 CPU processes
(gloo, the Trainer's DistributedDataParallel) train the adapter of 1 process with twice the per-device batch.

Why the two runs can agree exactly: the Trainer's data loader (accelerate's) draws one seeded permutation,
the same for any number of processes, cuts it into per-device batches and deals them out in turn, so the
step-k batches of the 2 processes (4 rows each) are the rows of the 1-process step-k batch of 8; with rows of
one length (the same number of loss tokens per process) DDP's average of the 2 mean-loss gradients is the
gradient of the mean over the 8 rows. The test checks the rows themselves (recorded by the worker), not only
the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from torch import Tensor

import deltatune as dt
from deltatune.io import adapter_tensors

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

WORKER = Path(__file__).with_name("hf_ddp_worker.py")
TOLERANCE = 1e-5
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def launch(launcher: list[str], out: Path, *args: str, tmp: Path) -> None:
    """Run the worker under ``launcher`` (empty: plain python, one process), one thread per process, with no
    accelerate config of the user's (HF_HOME points into the test's folder) and no inherited world."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp / "hf-home"), "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, *launcher, str(WORKER), "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


ACCELERATE = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max abs diff {diff:.3g}")
    return diff


def record(out: Path, rank: int) -> dict[str, Any]:
    return json.loads((out / f"rank{rank}.json").read_text())


def check_ddp_run(ddp: Path, one: Path, micro_batches: int, find_unused: bool) -> None:
    """Both ranks ran DDP (``find_unused_parameters`` as the Trainer chose it) and end bit-identical; per step
    they saw the 1-process run's rows, split in two halves; the adapter (and the saved folder) equal the
    1-process run's; the frozen base got no gradient."""
    rank0, rank1, single = record(ddp, 0), record(ddp, 1), record(one, 0)
    assert (rank0["world"], rank0["wrapper"], single["world"]) == (2, "DistributedDataParallel", 1)
    assert rank0["find_unused"] is find_unused
    assert len(rank0["seen"]) == len(single["seen"]) == micro_batches
    for first, second, whole in zip(rank0["seen"], rank1["seen"], single["seen"]):
        assert first + second == whole
    assert rank0["frozen_grads"] == rank1["frozen_grads"] == 0
    assert max_diff(tensors(ddp / "rank0.safetensors"), tensors(ddp / "rank1.safetensors")) == 0.0
    assert max_diff(tensors(ddp / "rank0.safetensors"), tensors(one / "rank0.safetensors")) <= TOLERANCE
    assert rank0["losses"] == pytest.approx(single["losses"], abs=1e-5)
    final = ddp / "final"
    assert ADAPTER_FILES <= set(os.listdir(final))
    assert not {"model.safetensors", "config.json"} & set(os.listdir(final))  # an adapter, not the whole model
    saved = tensors(final / "adapter_model.safetensors")
    assert max_diff(saved, tensors(one / "final" / "adapter_model.safetensors")) <= TOLERANCE
    lora_per_layer = 4 * 32 + 32 * 4 + 4 * 32 + 16 * 4  # q's A and B, v's A and B (v has 16 outputs)
    assert sum(t.numel() for t in saved.values()) == 2 * lora_per_layer  # the LoRA tensors alone
    # the checkpoint rank 0 wrote: the adapter, and the callback's resume file under the model's own names
    # (no "module." of the DDP wrapper), as the 1-process run writes it
    steps = len(single["losses"])  # one logged loss per step: the checkpoint is the last step's
    checkpoint, alone = ddp / "run" / f"checkpoint-{steps}", one / "run" / f"checkpoint-{steps}"
    assert ADAPTER_FILES <= set(os.listdir(checkpoint))
    assert max_diff(tensors(checkpoint / "model.safetensors"), tensors(alone / "model.safetensors")) <= TOLERANCE


def test_accelerate_launch_on_two_cpu_processes_equals_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    launch(ACCELERATE, tmp_path / "ddp", "--batch", "4", tmp=tmp_path)
    launch([], tmp_path / "one", "--batch", "8", tmp=tmp_path)
    check_ddp_run(tmp_path / "ddp", tmp_path / "one", micro_batches=3, find_unused=True)
    # the folder trainer.save_model wrote under DDP loads into a fresh model as the trained adapter
    from hf_ddp_worker import plain_llama

    model = dt.load(plain_llama(), tmp_path / "ddp" / "final")
    trained = tensors(tmp_path / "ddp" / "rank0.safetensors")
    assert max_diff({k: t.detach() for k, t in adapter_tensors(model, "default").items()}, trained) == 0.0


def test_torchrun_with_accumulation_and_gradient_checkpointing(tmp_path: Path) -> None:
    """DDP skips the all-reduce on the first micro-batch (no_sync) and recomputes the checkpointed blocks (the
    Trainer then turns find_unused_parameters off); 2 x (2 rows x 2 accumulated) equal 1 x (4 rows x 2
    accumulated) without checkpointing."""
    launch(TORCHRUN, tmp_path / "ddp", "--batch", "2", "--accum", "2", "--checkpointing", tmp=tmp_path)
    launch([], tmp_path / "one", "--batch", "4", "--accum", "2", tmp=tmp_path)
    check_ddp_run(tmp_path / "ddp", tmp_path / "one", micro_batches=6, find_unused=False)
