"""FSDP2 (``--fsdp``) with a 4-bit base, gradient checkpointing and deltatune's fused kernels: 2 gloo processes
on the tiny LLaMA give the adapter of the data-parallel run and of one process with the global micro-batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import train_command
from dist_worker import adapter_state, build_lm, config
from safetensors.torch import load_file
from test_distributed import TOLERANCE, bert, check, max_diff, ranks, run_worker, torchrun
from torch import Tensor

from deltatune.train import Trainer

__all__ = ["bert"]  # the tiny BERT fixture without dropout, shared with test_distributed

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

STEPS = ("--lm", "--batch", "4", "--accum", "2", "--steps", "4")


def lm_run(out: Path, *extra: str) -> None:
    """The tiny LLaMA on 2 processes (the worker's model and data arguments are unused with --lm)."""
    check(run_worker(Path("unused"), Path("unused"), out, *extra, *STEPS))


def one_process(out: Path, quantize: str = "none") -> dict[str, Tensor]:
    """The adapter of the 1-process run with the global micro-batch (8 rows, 2 accumulated)."""
    model, task, train, _ = build_lm(quantize)
    Trainer(model, task, train, (), config(out, batch_size=8, grad_accum=2, max_steps=4)).fit()
    return adapter_state(model)


def test_fsdp2_with_a_4bit_base_shards_the_float_parameters_and_keeps_the_packed_weights_whole(
        tmp_path: Path) -> None:
    """The packed NF4 weights are buffers, which fully_shard leaves alone: every rank keeps them whole (and
    frozen), the float parameters (embeddings, norms, head, adapter) are sharded DTensors; the adapter equals
    the data-parallel and the 1-process QLoRA runs'."""
    lm_run(tmp_path / "fsdp", "--fsdp", "--quantize", "nf4")
    lm_run(tmp_path / "ddp", "--quantize", "nf4")
    sharded, other = ranks(tmp_path / "fsdp")
    assert max_diff(sharded, other) == 0.0
    assert max_diff(sharded, ranks(tmp_path / "ddp")[0]) <= TOLERANCE
    assert max_diff(sharded, one_process(tmp_path / "one", "nf4")) <= TOLERANCE
    model, *_ = build_lm("nf4")
    packed = {name: [type(b).__name__, b.numel()] for name, b in model.named_buffers() if name.endswith(".weight")}
    assert len(packed) == 14  # q, k, v, o, gate, up, down in each of the 2 layers (lm_head stays dense)
    for rank in (0, 1):
        layout = json.loads((tmp_path / "fsdp" / f"layout{rank}.json").read_text())
        assert layout["parameters"] == ["DTensor"]
        assert layout["buffers"] == packed  # plain tensors of the whole size on each rank
    assert json.loads((tmp_path / "ddp" / "layout0.json").read_text())["parameters"] == ["Parameter"]
    written = load_file(tmp_path / "fsdp" / "run" / "adapter" / "adapter_model.safetensors")
    assert max_diff(written, load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")) <= TOLERANCE


def test_fsdp2_with_a_4bit_base_and_bf16(tmp_path: Path) -> None:
    """bf16 gathers with the 4-bit layers computing in the input's dtype: near the fp32 run, moved by rounding."""
    lm_run(tmp_path / "bf16", "--fsdp", "--bf16", "--quantize", "nf4")
    bf16 = ranks(tmp_path / "bf16")
    assert max_diff(*bf16) == 0.0
    assert 0.0 < max_diff(bf16[0], one_process(tmp_path / "one", "nf4")) < 1e-2


def test_fsdp2_with_gradient_checkpointing_and_fused_kernels(tmp_path: Path) -> None:
    """--gradient-checkpointing (reentrant, recomputing each sharded block: FSDP2 gathers it again) and
    --accelerate (the fused kernels patch forwards after sharding) together with --fsdp."""
    lm_run(tmp_path / "fsdp", "--fsdp", "--checkpointing", "--kernels")
    rank0, rank1 = ranks(tmp_path / "fsdp")
    assert max_diff(rank0, rank1) == 0.0
    assert max_diff(rank0, one_process(tmp_path / "one")) <= TOLERANCE


def test_the_command_line_with_fsdp_and_a_4bit_base(tmp_path: Path, bert: Path, sentiment_file: Path) -> None:
    """``--quantize nf4 --fsdp`` from the command line (BERT, the classifier head kept dense and trained):
    the adapter equals the data-parallel QLoRA run's."""
    runs = {}
    for name, extra in (("fsdp", ("--fsdp",)), ("ddp", ())):
        out = tmp_path / name
        check(torchrun("-m", "deltatune", *train_command(bert, sentiment_file, out, "--max-steps", "2", "--batch-size",
                                                         "4", "--quantize", "nf4", *extra)))
        runs[name] = load_file(out / "adapter" / "adapter_model.safetensors")
        assert json.loads((out / "run.json").read_text())["options"]["quantize"] == "nf4"
    assert max_diff(runs["fsdp"], runs["ddp"]) <= TOLERANCE
