"""Data-parallel training (DDP semantics) on CPU with gloo: 2 processes under torchrun equal 1 process
with twice the micro-batch; accumulation, kill + resume, the command line, and a failing rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import train_command
from dist_worker import adapter_state, build, build_lm, config
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from deltatune.errors import TrainingError
from deltatune.train import Trainer
from deltatune.train.distributed import World
from deltatune.train.trainer import MicroBatches, planned_steps

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

WORKER = Path(__file__).with_name("dist_worker.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """The tiny BERT without dropout: with it, 2 x 4 rows draw other masks than 1 x 8 rows."""
    folder = tmp_path_factory.mktemp("bert-no-dropout") / "model"
    shutil.copytree(tiny_bert_dir, folder)
    settings = json.loads((folder / "config.json").read_text())
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a free rendezvous port), one thread per rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTATUNE_DIST_TIMEOUT": "60"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def run_worker(model: Path, data: Path, out: Path, *extra: str,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return torchrun(str(WORKER), "--model", str(model), "--data", str(data), "--out", str(out), *extra,
                    timeout=timeout)


def one_process(model_dir: Path, data: Path, out: Path, **changes: int) -> dict[str, Tensor]:
    """The adapter of a 1-process run (the reference)."""
    model, task, train, test = build(model_dir, data)
    Trainer(model, task, train, test, config(out, **changes)).fit()
    return adapter_state(model)


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max abs diff {diff:.3g}")  # shown with pytest -s: the exactness figures
    return diff


def ranks(out: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")


def check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_ranks_share_the_rows_of_one_process_with_the_global_batch() -> None:
    single = MicroBatches(50, 8, seed=3)
    shards = [MicroBatches(50, 4, seed=3, world=World(rank, 2)) for rank in (0, 1)]
    for k in range(20):  # several epochs: 50 rows make 6 micro-batches of 8
        assert shards[0].indices(k) + shards[1].indices(k) == single.indices(k)
    config_ = config(Path("unused"), batch_size=4, max_steps=0, epochs=1)
    assert planned_steps(50, config_, world_size=2) == planned_steps(50, config(Path("unused"), batch_size=8,
                                                                                 max_steps=0, epochs=1))


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path: Path, bert: Path,
                                                              sentiment_file: Path) -> None:
    check(run_worker(bert, sentiment_file, tmp_path / "ddp", "--batch", "4", "--steps", "6"))
    rank0, rank1 = ranks(tmp_path / "ddp")
    assert max_diff(rank0, rank1) == 0.0  # same synchronised gradients, same updates: bit-identical
    reference = one_process(bert, sentiment_file, tmp_path / "one", batch_size=8, max_steps=6)
    assert max_diff(rank0, reference) <= TOLERANCE
    # rank 0 alone wrote the adapter and the log
    run = tmp_path / "ddp" / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # train at 2, 4, 6 + the final eval


def test_gradient_accumulation_synchronises_once_and_gives_the_same_update(tmp_path: Path, bert: Path,
                                                                           sentiment_file: Path) -> None:
    check(run_worker(bert, sentiment_file, tmp_path / "ddp", "--batch", "2", "--accum", "2",
                     "--steps", "4"))
    rank0, rank1 = ranks(tmp_path / "ddp")
    assert max_diff(rank0, rank1) == 0.0
    reference = one_process(bert, sentiment_file, tmp_path / "one", batch_size=4, grad_accum=2, max_steps=4)
    assert max_diff(rank0, reference) <= TOLERANCE


def test_a_token_weighted_loss_uses_the_global_token_count(tmp_path: Path, bert: Path, sentiment_file: Path) -> None:
    """Causal LM: the ranks' rows hold different numbers of labelled tokens; the step still averages over all."""
    check(run_worker(bert, sentiment_file, tmp_path / "ddp", "--lm", "--batch", "4", "--accum", "2", "--steps", "4"))
    rank0, rank1 = ranks(tmp_path / "ddp")
    assert max_diff(rank0, rank1) == 0.0
    model, task, train, _ = build_lm()
    Trainer(model, task, train, (), config(tmp_path / "one", batch_size=8, grad_accum=2, max_steps=4)).fit()
    assert max_diff(rank0, adapter_state(model)) <= TOLERANCE


def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path: Path, bert: Path,
                                                      sentiment_file: Path) -> None:
    killed = run_worker(bert, sentiment_file, tmp_path / "ddp", "--steps", "6", "--save-every", "3",
                        "--stop-at", "4")
    assert killed.returncode != 0
    assert (tmp_path / "ddp" / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    shutil.copytree(tmp_path / "ddp" / "run", tmp_path / "alone")  # to resume in one process below
    check(run_worker(bert, sentiment_file, tmp_path / "ddp", "--steps", "6", "--save-every", "3",
                     "--resume"))
    rank0, rank1 = ranks(tmp_path / "ddp")
    assert max_diff(rank0, rank1) == 0.0
    reference = one_process(bert, sentiment_file, tmp_path / "one", batch_size=8, max_steps=6)
    assert max_diff(rank0, reference) <= TOLERANCE
    # the same global micro-batch (1 x 8 rows for 2 x 4) resumes the 2-process checkpoint in one process
    model, task, train, test = build(bert, sentiment_file)
    Trainer(model, task, train, test, config(tmp_path / "alone", max_steps=6, save_every=3)).fit(resume=True)
    assert max_diff(adapter_state(model), reference) <= TOLERANCE
    model, task, train, test = build(bert, sentiment_file)
    with pytest.raises(TrainingError, match="whose product is 8"):
        Trainer(model, task, train, test, config(tmp_path / "alone", batch_size=4, max_steps=6)).fit(resume=True)


def test_a_failing_rank_stops_the_run_with_its_message(tmp_path: Path, bert: Path,
                                                       sentiment_file: Path) -> None:
    # The collective timeout is 1800 s (distributed.timeout()): a waiting rank that sat it out would
    # exceed this hang guard, whose TimeoutExpired fails the test. torchrun must stop it instead.
    result = run_worker(bert, sentiment_file, tmp_path / "ddp", "--fail-rank", "1", timeout=600)
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stdout + result.stderr
    assert not (tmp_path / "ddp" / "run" / "adapter").exists()


def test_the_command_line_under_torchrun_writes_one_adapter(tmp_path: Path, bert: Path,
                                                            sentiment_file: Path) -> None:
    out = tmp_path / "run"
    args = train_command(bert, sentiment_file, out, "--max-steps", "2", "--batch-size", "8")
    result = torchrun("-m", "deltatune", *args)
    check(result)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["adapter", "best", "metrics.jsonl", "run.json"]
    assert result.stdout.count("training 2 steps: batch 8 x 1 x 2 processes") == 1  # rank 0 alone prints
    model, _ = dt_model(out)
    assert dt.adapter_names(model) == ["default"]


def dt_model(out: Path) -> tuple[nn.Module, object]:
    from deltatune.train.commands import model_for_adapter

    return model_for_adapter(out)


def test_a_group_ends_at_a_barrier_after_a_good_run_and_at_once_after_a_failed_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The barrier lets gloo release the last collective's tensors before Python exits (an exit abort in 3 of 67
    two-process FSDP worker runs without it, 0 of 100 with it); after a failure it would wait for a rank that never comes."""
    from deltatune.train import distributed

    calls: list[str] = []
    monkeypatch.setattr(distributed, "start", lambda device: True)
    monkeypatch.setattr(distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed, "stop", lambda: calls.append("stop"))
    with distributed.process_group(torch.device("cpu")):
        pass
    assert calls == ["barrier", "stop"]
    calls.clear()
    with pytest.raises(RuntimeError, match="rank failed"), distributed.process_group(torch.device("cpu")):
        raise RuntimeError("rank failed")
    assert calls == ["stop"]


def test_deltatune_functions_see_through_a_ddp_wrapper(bert: Path, sentiment_file: Path,
                                                       tmp_path: Path) -> None:
    """Trainer(DDP(model)) and dt.save(DDP(model)) work as on the model itself (a one-process gloo group)."""
    import torch.distributed as dist

    model, task, train, _ = build(bert, sentiment_file)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert dt.adapter_names(wrapped) == ["default"]
        Trainer(wrapped, task, train, (), config(tmp_path / "run", max_steps=2)).fit()
        dt.save(wrapped, tmp_path / "wrapped")
        dt.save(model, tmp_path / "plain")
    finally:
        dist.destroy_process_group()
    saved = load_file(tmp_path / "wrapped" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in saved)


def test_gradients_travel_once_per_step_and_only_the_adapters(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              bert: Path, sentiment_file: Path) -> None:
    """Accumulation sends nothing between micro-batches; the bucket holds the trainable parameters only."""
    import deltatune.train.trainer as trainer_module

    sent: list[int] = []
    monkeypatch.setattr(trainer_module.distributed, "all_reduce_mean",
                        lambda params: sent.append(sum(p.numel() for p in params)))
    model, task, train, _ = build(bert, sentiment_file)
    Trainer(model, task, train, (), config(tmp_path, grad_accum=3, max_steps=2)).fit()
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sent == [adapter, adapter]
    assert adapter < sum(p.numel() for p in model.parameters()) // 5  # the frozen base is most of the model


# -- sharded (FSDP2) -------------------------------------------------------------------------


def plain_llama() -> nn.Module:
    """The tiny LLaMA of ``build_lm`` without an adapter (same seed, same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.train.trainer import seed_everything

    seed_everything(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                        max_position_embeddings=64))


def test_fsdp2_trains_the_adapter_of_ddp_and_of_one_process(tmp_path: Path, bert: Path, sentiment_file: Path) -> None:
    """fully_shard on the tiny LLaMA: the same adapter as the data-parallel run and the 1-process run with the
    global micro-batch; rank 0 writes the folder a 1-process run writes, and it loads into a plain model."""
    steps = ("--lm", "--batch", "4", "--accum", "2", "--steps", "4")
    check(run_worker(bert, sentiment_file, tmp_path / "fsdp", "--fsdp", *steps))
    check(run_worker(bert, sentiment_file, tmp_path / "ddp", *steps))
    sharded, _ = ranks(tmp_path / "fsdp")
    assert max_diff(sharded, ranks(tmp_path / "fsdp")[1]) == 0.0  # both ranks gathered the same adapter
    assert max_diff(sharded, ranks(tmp_path / "ddp")[0]) <= TOLERANCE
    model, task, train, _ = build_lm()
    Trainer(model, task, train, (), config(tmp_path / "one", batch_size=8, grad_accum=2, max_steps=4)).fit()
    assert max_diff(sharded, adapter_state(model)) <= TOLERANCE
    folder = tmp_path / "fsdp" / "run" / "adapter"
    one = tmp_path / "one" / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (folder / "adapter_config.json").read_text() == (one / "adapter_config.json").read_text()
    written = load_file(folder / "adapter_model.safetensors")
    assert max_diff(written, load_file(one / "adapter_model.safetensors")) <= TOLERANCE
    loaded = plain_llama()
    dt.load(loaded, folder)
    assert max_diff(adapter_state(loaded), sharded) == 0.0


def test_fsdp2_with_bf16_gathers_in_bf16_and_saves_fp32(tmp_path: Path, bert: Path, sentiment_file: Path) -> None:
    """MixedPrecisionPolicy(bf16 parameters, fp32 reduction) on CPU/gloo: it trains near the fp32 run."""
    check(run_worker(bert, sentiment_file, tmp_path / "bf16", "--fsdp", "--bf16", "--lm", "--steps", "4"))
    check(run_worker(bert, sentiment_file, tmp_path / "fp32", "--fsdp", "--lm", "--steps", "4"))
    written = load_file(tmp_path / "bf16" / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.float32}
    bf16, fp32 = ranks(tmp_path / "bf16")[0], ranks(tmp_path / "fp32")[0]
    assert 0.0 < max_diff(bf16, fp32) < 1e-2  # bf16 rounding moved it (the policy applied), by little


def test_fsdp2_shards_each_decoder_layer() -> None:
    from deltatune.train.fsdp import blocks

    model, *_ = build_lm()
    assert blocks(model) == list(model.model.layers)


def test_fsdp2_needs_several_processes(tmp_path: Path) -> None:
    """Refused with what to do instead, the model left unsharded."""
    model, task, train, _ = build_lm()
    with pytest.raises(TrainingError, match="torchrun --nproc_per_node"):
        Trainer(model, task, train, (), config(tmp_path, fsdp=True))
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())


def test_saving_a_ddp_wrapped_model_with_trained_biases_drops_the_module_prefix(tmp_path: Path) -> None:
    """bias="all" lists the model's own parameters by name: through a DDP wrapper they carry "module."."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["0"], bias="all"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dt.save(nn.parallel.DistributedDataParallel(model), tmp_path / "wrapped")
    finally:
        dist.destroy_process_group()
    dt.save(model, tmp_path / "plain")
    saved = load_file(tmp_path / "wrapped" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert any(k.endswith("2.bias") for k in plain)  # the untargeted layer's bias is saved too
    assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in saved)


def test_fsdp2_kill_and_resume_equals_the_uninterrupted_run(tmp_path: Path, bert: Path, sentiment_file: Path) -> None:
    """Checkpoints of a sharded run hold whole tensors (the 1-process form); resume slices them back."""
    steps = ("--fsdp", "--lm", "--steps", "6", "--save-every", "3")
    killed = run_worker(bert, sentiment_file, tmp_path / "fsdp", *steps, "--stop-at", "4")
    assert killed.returncode != 0
    checkpoint = tmp_path / "fsdp" / "run" / "checkpoints" / "step-0000003"
    assert (checkpoint.parent / "latest").read_text().strip() == checkpoint.name
    shutil.copytree(tmp_path / "fsdp" / "run", tmp_path / "alone")
    check(run_worker(bert, sentiment_file, tmp_path / "fsdp", *steps, "--resume"))
    rank0, rank1 = ranks(tmp_path / "fsdp")
    assert max_diff(rank0, rank1) == 0.0
    model, task, train, _ = build_lm()
    Trainer(model, task, train, (), config(tmp_path / "one", batch_size=8, max_steps=6)).fit()
    reference = adapter_state(model)
    assert max_diff(rank0, reference) <= TOLERANCE
    # the sharded checkpoint resumes in one process with the same global micro-batch, as a DDP one does
    model, task, train, _ = build_lm()
    Trainer(model, task, train, (), config(tmp_path / "alone", batch_size=8, max_steps=6, save_every=3)).fit(resume=True)
    assert max_diff(adapter_state(model), reference) <= TOLERANCE


def test_the_command_line_with_fsdp_trains_a_classifier_that_loads(tmp_path: Path, bert: Path,
                                                                   sentiment_file: Path) -> None:
    """``--fsdp`` from the command line on the sentiment data: BERT with LoRA and a trained classifier head
    (a saved module), sharded; the adapter equals the data-parallel run's."""
    runs = {}
    for name, extra in (("fsdp", ("--fsdp",)), ("ddp", ())):
        out = tmp_path / name
        check(torchrun("-m", "deltatune", *train_command(bert, sentiment_file, out, "--max-steps", "2",
                                                         "--batch-size", "4", *extra)))
        runs[name] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert max_diff(runs["fsdp"], runs["ddp"]) <= TOLERANCE
    model, _ = dt_model(tmp_path / "fsdp")
    assert dt.adapter_names(model) == ["default"]


# -- evaluation split across ranks -----------------------------------------------------------

EVAL_WORKER = Path(__file__).with_name("eval_worker.py")
ROUNDED = {"loss", "neg_loss", "perplexity", "pair_cosine"}
"""Means of per-row floats: a row's forward pass shares its batch (and padding) with other rows on a rank than
in one process, which moves its logits by float rounding. Every other metric counts discrete outcomes."""


def test_each_rank_takes_a_contiguous_slice_and_the_slices_make_the_set_in_order() -> None:
    from deltatune.train.eval_shard import shard

    for count, size in ((9, 2), (8, 2), (1, 2), (5, 4), (3, 3), (7, 1)):
        slices = [shard(count, World(rank, size)) for rank in range(size)]
        assert {len(s) for s in slices} == {-(-count // size)}  # equal: as many forward passes on every rank
        assert [i for s in slices for i in s][:count] == list(range(count))
    assert [shard(5, World(rank, 4)) for rank in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder per evaluation kind of eval_worker.py, named by the kind."""
    from eval_worker import KINDS, arch_of, task_of
    from task_runs import model_folder

    root = tmp_path_factory.mktemp("eval-models")
    for kind in KINDS:
        (root / kind).mkdir()
        model_folder(root / kind, task_of(kind), arch_of(kind))
    return root


def whole_set(kind: str, root: Path, out: Path) -> tuple[dict[str, float], list[Any]]:
    """The metrics of one process evaluating the whole set of ``kind``, and its per-row outputs."""
    from eval_worker import EVAL_BATCH, build, leaves, trainer

    from deltatune.train.eval_shard import splits

    model, task, features = build(kind, root / kind)
    metrics = trainer(model, task, features, out).evaluate()
    model.eval()
    return metrics, leaves(task.outputs(model, features, EVAL_BATCH)) if splits(task) else []


def check_split_evaluation(out: Path, root: Path, kinds: Sequence[str], fsdp: bool = False) -> None:
    """Both ranks report the metrics of one process on the whole set, each having evaluated only its slice,
    and scored them from the per-row outputs of one process, in the same order. A task without per-row
    outputs is evaluated whole, by rank 0 (by every rank under FSDP2)."""
    from eval_worker import EVAL_ROWS

    rank0, rank1 = (json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1))
    for kind in kinds:
        assert rank0[kind]["metrics"] == rank1[kind]["metrics"], kind
        whole, rows = whole_set(kind, root, out / "one")
        if kind.endswith("-whole"):
            assert (rank0[kind]["rows"], rank1[kind]["rows"]) == ([EVAL_ROWS], [EVAL_ROWS] if fsdp else []), kind
            assert rank0[kind]["metrics"] == whole
            continue
        assert rank0[kind]["rows"] == rank1[kind]["rows"] == [-(-EVAL_ROWS // 2)], kind
        floats = [v for v in rows if isinstance(v, float)]
        for gathered in (rank0[kind]["outputs"][0], rank1[kind]["outputs"][0]):
            assert len(gathered) == len(rows), kind
            assert [v for v in gathered if not isinstance(v, float)] == [v for v in rows if not isinstance(v, float)]
            assert [v for v in gathered if isinstance(v, float)] == pytest.approx(floats, rel=1e-5, abs=1e-6), kind
        got = rank0[kind]["metrics"]
        assert got.keys() == whole.keys(), kind
        # shown with pytest -s: the metrics, and how far the per-row floats moved
        moved = max((abs(a - b) for a, b in zip(rank0[kind]["outputs"][0], rows) if isinstance(b, float)), default=0.0)
        print(kind, {k: (got[k], whole[k]) for k in got}, f"per-row floats: max abs diff {moved:.3g}")
        for name, value in got.items():
            if name in ROUNDED:
                assert value == pytest.approx(whole[name], rel=1e-6, abs=1e-7), (kind, name)
            else:
                assert value == whole[name], (kind, name)


def test_evaluation_is_split_across_ranks_and_equals_one_process_for_every_task(tmp_path: Path,
                                                                                 eval_models: Path) -> None:
    """Every task type, 9 rows on 2 ranks (5 + 4, filled up to 5): the gathered per-row outputs give the metrics
    of one process, also those that do not average over slices (macro F1, entity F1, Spearman, retrieval)."""
    from eval_worker import KINDS, task_of

    from deltatune.train.tasks import TASKS

    assert {task_of(kind) for kind in KINDS} == set(TASKS)
    check(torchrun(str(EVAL_WORKER), "--root", str(eval_models), "--out", str(tmp_path / "ddp"), timeout=600))
    check_split_evaluation(tmp_path / "ddp", eval_models, list(KINDS))


def test_sharded_evaluation_under_fsdp2_runs_the_ranks_in_step(tmp_path: Path, eval_models: Path) -> None:
    """FSDP2: every forward pass is a collective, so the ranks' slices are equal in length and generation
    steps together (here seq2seq's greedy decoding takes 16 steps on rank 0 and 15 on rank 1: transformers'
    ``synced_gpus`` keeps rank 1 stepping until rank 0 is done); the metrics are one process's."""
    kinds = ["causal-lm", "seq2seq", "seq-cls", "seq-cls-whole"]
    check(torchrun(str(EVAL_WORKER), "--root", str(eval_models), "--out", str(tmp_path / "fsdp"), "--fsdp",
                   "--kinds", *kinds, timeout=600))
    check_split_evaluation(tmp_path / "fsdp", eval_models, kinds, fsdp=True)


def test_the_command_line_evaluates_max_eval_rows_split_across_ranks_as_one_process(
        tmp_path: Path, bert: Path, sentiment_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--max-eval-rows 7`` under torchrun (4 + 3 rows, in batches of 2): the evaluation before training, of
    the same starting model, prints the metrics of one process evaluating the 7 rows (to 4 decimals: exact
    for counts out of 7)."""
    from deltatune.cli import main

    extra = ("--max-steps", "1", "--batch-size", "4", "--max-eval-rows", "7", "--eval-batch-size", "2")
    result = torchrun("-m", "deltatune", *train_command(bert, sentiment_file, tmp_path / "two", *extra))
    check(result)
    capsys.readouterr()
    assert main(train_command(bert, sentiment_file, tmp_path / "one", *extra)) == 0
    printed = capsys.readouterr().out

    def before(output: str) -> str:
        return next(line for line in output.splitlines() if line.startswith("before training: "))

    assert "7 evaluation rows" in printed and "7 evaluation rows" in result.stdout
    assert before(result.stdout) == before(printed)
    print(before(printed))
