"""``deltatune train --fsdp`` under torchrun initialises the ranks other than 0 on the meta device: only rank 0
loads the weights, the others receive their shards. 2 gloo processes give the adapter and the evaluation of the
data-parallel run (every rank fully loaded), rank 1 never holds the whole model, and resuming works.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from test_distributed import TOLERANCE, check, max_diff, torchrun

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

MiB = 2 ** 20
WORKER = Path(__file__).with_name("rss_worker.py")


def llama(folder: Path, tokenizer_dir: Path, hidden: int, layers: int, vocab: int, intermediate: int) -> int:
    """A random LLaMA saved with the tiny BERT's tokenizer (its ids are below ``vocab``; [SEP] ends a completion);
    its size in bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                                         num_key_value_heads=4, intermediate_size=intermediate, vocab_size=vocab,
                                         max_position_embeddings=64))
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.eos_token = tokenizer.sep_token  # ends the completions
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def completions(folder: Path) -> Path:
    """Prompt/completion rows with train and test splits (a sentiment word's label as the completion)."""
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    rows = [{"prompt": f"the film was {words[i % 6]} and long", "completion": " yes" if i % 2 == 0 else " no",
             "split": "train" if i < 48 else "test"} for i in range(60)]
    return write_jsonl(folder / "data.jsonl", rows)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "causal-lm", "--model", str(model), "--train-file", str(data), "--output-dir", str(out),
            "--no-progress", "--batch-size", "4", "--max-length", "24", "--threads", "1", "--lora-dropout", "0",
            "--target-modules", "q_proj", "v_proj", "--max-eval-rows", "8", "--initial-eval", *extra]


def run(model: Path, data: Path, out: Path, *extra: str, full_load: bool = False) -> str:
    """``deltatune train`` on 2 processes, each rank writing its peak RSS to ``out/rss<rank>.json``; the output.
    ``full_load``: every rank loads the whole model (``--fsdp`` before meta initialisation)."""
    result = torchrun(str(WORKER), str(out), *(["--full-load"] if full_load else []),
                      *train_args(model, data, out, *extra), timeout=900)
    check(result)
    return result.stdout


def peaks_mib(out: Path) -> list[dict[str, float]]:
    """Per rank, the peak RSS once the model was loaded and sharded, and at the end (ru_maxrss is in KiB;
    the data-parallel run has no "sharded")."""
    return [{k: v / 1024 for k, v in json.loads((out / f"rss{r}.json").read_text()).items()} for r in (0, 1)]


def reports(stdout: str) -> list[str]:
    """The evaluations rank 0 printed, before and after training."""
    return [line for line in stdout.splitlines() if line.startswith(("before training:", "after training:"))]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_meta_builder_gives_the_architecture_from_pretrained_loads(tiny_bert_dir: Path,
                                                                       dtype: torch.dtype | None) -> None:
    """``models_on_meta``: the model class from the saved config on the meta device, with from_pretrained's
    config arguments (a 3-label head) and dtype; the tokenizer still loads."""
    from deltatune.hf import from_pretrained, models_on_meta

    labels = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    loaded = from_pretrained("AutoModelForSequenceClassification", str(tiny_bert_dir), dtype=dtype, **labels)
    with models_on_meta():
        built = from_pretrained("AutoModelForSequenceClassification", str(tiny_bert_dir), dtype=dtype, **labels)
        assert from_pretrained("AutoTokenizer", str(tiny_bert_dir)).vocab_size > 0
    assert all(t.is_meta for t in built.state_dict().values())
    assert layout(built) == layout(loaded)
    assert built.config.id2label == loaded.config.id2label


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return completions(tmp_path_factory.mktemp("completions"))


def test_rank_1_receives_only_its_shards_and_trains_the_adapter_of_a_full_load(
        tmp_path: Path, tiny_bert_dir: Path, data: Path) -> None:
    """A 56M-parameter LLaMA (214 MiB in fp32). Once loaded and sharded, rank 1 (shards and one whole tensor in
    flight) has peaked well below rank 0 (which also holds the whole model), and no higher than rank 1 of the
    --fsdp run where every rank loads the model (transformers maps the checkpoint file, so that rank's resident
    set grows only by the pages sharding reads: a small gap on the CPU). The adapter and the evaluations
    before and after training (rotary buffers taken from rank 0) equal that run's and the data-parallel run's."""
    size = llama(tmp_path / "model", tiny_bert_dir, hidden=512, layers=8, vocab=32000, intermediate=1376) / MiB
    steps = ("--max-steps", "3")
    outputs = {"meta": run(tmp_path / "model", data, tmp_path / "meta", "--fsdp", *steps),
               "full": run(tmp_path / "model", data, tmp_path / "full", "--fsdp", *steps, full_load=True),
               "ddp": run(tmp_path / "model", data, tmp_path / "ddp", *steps)}
    for other in ("full", "ddp"):
        assert max_diff(adapter(tmp_path / "meta"), adapter(tmp_path / other)) <= TOLERANCE
        assert len(reports(outputs["meta"])) == 2
        assert reports(outputs["meta"]) == reports(outputs[other])  # printed to 4 decimals
    peaks = {name: peaks_mib(tmp_path / name) for name in ("meta", "full", "ddp")}
    print(f"model {size:.0f} MiB; peak RSS MiB per rank: {peaks}")
    assert peaks["meta"][0]["sharded"] - peaks["meta"][1]["sharded"] > size / 3
    assert peaks["meta"][1]["sharded"] < peaks["full"][1]["sharded"]


def test_an_adapter_initialised_from_the_base_weights_comes_from_rank_0(tmp_path: Path, tiny_bert_dir: Path,
                                                                         data: Path) -> None:
    """DoRA's magnitudes start as the base weights' column norms, which the meta ranks cannot compute: they
    receive rank 0's, and the run trains the data-parallel run's adapter."""
    llama(tmp_path / "model", tiny_bert_dir, hidden=64, layers=2, vocab=32000, intermediate=128)
    for name, extra in (("meta", ("--fsdp",)), ("ddp", ())):
        run(tmp_path / "model", data, tmp_path / name, "--method", "dora", "--max-steps", "2", *extra)
    assert max_diff(adapter(tmp_path / "meta"), adapter(tmp_path / "ddp")) <= TOLERANCE


def test_a_meta_initialised_run_resumes_to_the_uninterrupted_adapter(tmp_path: Path, tiny_bert_dir: Path,
                                                                     data: Path) -> None:
    """4 steps with a checkpoint every 2; the last checkpoint and the adapter removed (``latest`` names step 2's),
    --resume trains steps 3 and 4 again from step 2's checkpoint and gives the same adapter."""
    llama(tmp_path / "model", tiny_bert_dir, hidden=64, layers=2, vocab=32000, intermediate=128)
    out = tmp_path / "fsdp"
    run(tmp_path / "model", data, out, "--fsdp", "--max-steps", "4", "--save-every", "2")
    straight = adapter(out)
    root = out / "checkpoints"
    assert sorted(c.name for c in root.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    shutil.rmtree(root / "step-0000004")
    (root / "latest").write_text("step-0000002\n")
    shutil.rmtree(out / "adapter")
    run(tmp_path / "model", data, out, "--fsdp", "--max-steps", "4", "--save-every", "2", "--resume")
    assert max_diff(adapter(out), straight) == 0.0
