"""The NCCL path: 2 processes on 2 GPUs under torchrun, DDP and FSDP2, against one GPU process with twice
the micro-batch. The code is the CPU path's (tests/test_distributed.py) with the backend the device picks;
these tests need two CUDA devices (NCCL refuses two ranks on one GPU) and are skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_worker import adapter_state, build, config
from test_distributed import TOLERANCE, bert, check, max_diff, ranks, run_worker  # noqa: F401 (bert: a fixture)
from torch import Tensor

from deltatune.train import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL with 2 ranks needs 2 CUDA devices")]


def one_gpu_process(model_dir: Path, data: Path, out: Path, **changes: int) -> dict[str, Tensor]:
    """The reference: one process on the first GPU with the global micro-batch."""
    model, task, train, test = build(model_dir, data)
    model.to("cuda:0")
    Trainer(model, task, train, test, config(out, **changes)).fit()
    return {k: t.cpu() for k, t in adapter_state(model).items()}


def test_nccl_data_parallel_equals_one_gpu_process_with_twice_the_batch(tmp_path: Path, bert: Path,  # noqa: F811
                                                                        sentiment_file: Path) -> None:
    check(run_worker(bert, sentiment_file, tmp_path / "ddp", "--batch", "4", "--steps", "6", "--cuda",
                     timeout=300))
    rank0, rank1 = ranks(tmp_path / "ddp")
    assert max_diff(rank0, rank1) == 0.0
    reference = one_gpu_process(bert, sentiment_file, tmp_path / "one", batch_size=8, max_steps=6)
    assert max_diff(rank0, reference) <= TOLERANCE


def test_nccl_fsdp2_equals_data_parallel(tmp_path: Path, bert: Path, sentiment_file: Path) -> None:  # noqa: F811
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        check(run_worker(bert, sentiment_file, tmp_path / name, "--batch", "4", "--steps", "4", "--cuda", *extra,
                         timeout=300))
    assert max_diff(ranks(tmp_path / "fsdp")[0], ranks(tmp_path / "ddp")[0]) <= TOLERANCE
