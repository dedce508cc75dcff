"""Bottleneck adapters (``--method houlsby|pfeiffer|parallel``) trained by ``deltatune train`` for every
task type, on the architecture test_tasks.py uses for it (BERT, LLaMA, T5) and on other families
with site tables (RoBERTa, XLM-R, DistilBERT, GPT-2, LLaMA, Mistral, Qwen3, mT5): the loss falls, only the adapter and the task head train, the run folder rebuilds the
trained model exactly, and ``dt.disabled`` gives the base model back. A model family without a site
table is refused with a clear error before anything is written."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from task_fixtures import (A_WORDS, bert_folder, llama_folder, minilm_tokenizer, ner_rows, pair_rows, qa_rows, t5_folder,
                           translation_rows, word_tokenizer)
from torch import Tensor, nn

import deltatune as dt
import deltatune.train.run as run_module
from deltatune.cli import main
from deltatune.train import Trainer, seed_everything
from deltatune.train.run import rebuild
from deltatune.train.tasks import Task

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

Rows = list[dict[str, Any]]
WIDTH = 32
"""The hidden size of every tiny model here."""
STEPS = 6
REDUCTION = {"houlsby": 8, "pfeiffer": 16, "parallel": 4}
"""The bottleneck's hidden size / width per method: given with --reduction-factor, except pfeiffer's
16, its preset's default (parallel's default is 2)."""
SITES_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}
DECODERS = ("gpt2", "mistral", "qwen3", "opt")


# -- data and tiny model folders ---------------------------------------------------------------

def seq_cls_rows(n: int, seed: int) -> Rows:
    """a-word sentences labelled by whether their first word is one of a0..a7."""
    return [{"text": a, "label": "low" if A_WORDS.index(a.split()[0]) < 8 else "high"}
            for a, _ in translation_rows(n, seed)]


def lm_rows(task: str, n: int, seed: int) -> Rows:
    if task == "causal-lm":
        return [{"prompt": a + " =>", "completion": b} for a, b in translation_rows(n, seed)]
    return [{"source": a, "target": b} for a, b in translation_rows(n, seed)]


DATA: dict[str, Callable[[int, int], Rows]] = {
    "seq-cls": seq_cls_rows, "token-cls": ner_rows, "qa": qa_rows, "feature-extraction": pair_rows,
    "causal-lm": lambda n, seed: lm_rows("causal-lm", n, seed), "seq2seq": lambda n, seed: lm_rows("seq2seq", n, seed)}

TOKENIZER = {"seq-cls": "encoder", "token-cls": "minilm", "qa": "minilm", "feature-extraction": "encoder",
             "causal-lm": "decoder", "seq2seq": "t5"}
"""Token and span tasks need real sub-words and character offsets: MiniLM's WordPiece tokenizer."""


def other_folder(folder: Path, arch: str, vocab_size: int, pad: int, eos: int) -> None:
    """A 2-layer (per stack) random model of width 32 of ``arch``, with its LM head where it has one."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    sizes: dict[str, dict[str, Any]] = {
        "roberta": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                    "max_position_embeddings": 160},
        "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
        "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 160},
        "mt5": {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16, "decoder_start_token_id": pad},
        "bart": {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
                 "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                 "decoder_start_token_id": eos, "forced_eos_token_id": None},
        "opt": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
                "word_embed_proj_dim": 32},
    }
    decoder = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 64, "head_dim": 8, "initializer_range": 0.3}
    sizes["xlm-roberta"] = sizes["roberta"]
    for kind in ("mistral", "qwen3"):  # not qwen2: transformers loads a qwen2 folder with its own tokenizer class
        sizes[kind] = decoder
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, pad_token_id=pad, eos_token_id=eos, bos_token_id=eos,
                                  **sizes[arch])
    auto = AutoModelForSeq2SeqLM if arch in ("mt5", "bart") else AutoModelForCausalLM if arch in DECODERS else AutoModel
    torch.manual_seed(0)
    auto.from_config(config).save_pretrained(folder)


def model_folder(folder: Path, task: str, arch: str) -> Path:
    """``folder`` with a tokenizer for ``task`` and a tiny ``arch`` model saved in it."""
    kind = TOKENIZER[task] if arch not in ("t5", "mt5", "bart") else "t5"
    tokenizer = minilm_tokenizer(folder) if kind == "minilm" else word_tokenizer(folder, kind)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if arch == "bert":
        bert_folder(folder, len(tokenizer))
    elif arch == "llama":
        llama_folder(folder, len(tokenizer), tokenizer.eos_token_id)
    elif arch == "t5":
        t5_folder(folder, len(tokenizer))
    else:
        other_folder(folder, arch, len(tokenizer), pad, tokenizer.eos_token_id)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """(task, architecture) -> a model folder, made once per module."""
    made: dict[tuple[str, str], Path] = {}

    def get(task: str, arch: str) -> Path:
        if (task, arch) not in made:
            made[task, arch] = model_folder(tmp_path_factory.mktemp(f"{task}-{arch}"), task, arch)
        return made[task, arch]
    return get


def write(path: Path, rows: Rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# -- a run, watched --------------------------------------------------------------------------

@dataclass
class Watched:
    """The trainer a ``deltatune train`` run built, its model's parameters before training and the
    training loss (all training rows, one batch, eval mode) before and after."""

    trainer: Trainer
    before: dict[str, Tensor]
    loss_before: float
    loss_after: float = math.nan

    @property
    def model(self) -> nn.Module:
        return self.trainer.model


def training_loss(trainer: Trainer) -> float:
    model, was_training = trainer.model, trainer.model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(trainer.task.loss(model, trainer.task.collate(trainer.train_features)))
    finally:
        model.train(was_training)


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Watched]]:
    """Every trainer that ``deltatune train`` builds while the test runs."""
    runs: list[Watched] = []

    class Watching(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            runs.append(Watched(self, before, training_loss(self)))

        def fit(self, resume: bool = False) -> Any:
            result = super().fit(resume)
            runs[-1].loss_after = training_loss(self)
            return result

    monkeypatch.setattr(run_module, "Trainer", Watching)
    yield runs


def outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Every floating tensor the model returns for ``batch`` (loss, logits, hidden states), flattened.
    A sentence-pair batch (feature-extraction) is given as its first sentences."""
    inputs = {k: v for k, v in batch.items() if not k.endswith("_2") and k != "score"}
    with torch.no_grad():
        out = model(**inputs)
    return torch.cat([v.float().flatten() for v in out.values() if isinstance(v, Tensor) and v.is_floating_point()])


def train(folder: Path, out: Path, task: str, method: str) -> list[str]:
    data = DATA[task]
    args = ["train", "--task", task, "--model", str(folder), "--method", method,
            "--train-file", write(out.parent / f"{out.name}-train.jsonl", data(16, 1)),
            "--eval-file", write(out.parent / f"{out.name}-eval.jsonl", data(4, 2)), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", "8", "--lr", "1e-2", "--schedule", "constant",
            "--warmup-ratio", "0", "--log-every", "1", "--max-length", "48", "--threads", "1", "--no-progress"]
    if method != "pfeiffer":
        args += ["--reduction-factor", str(REDUCTION[method])]
    return args


# -- the cases -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    task: str
    arch: str
    method: str
    heads: tuple[str, ...]
    """The modules that train in full with the adapter (the task's new head)."""
    layers: int = 2
    """Transformer layers with sites (T5: encoder and decoder blocks)."""

    def __str__(self) -> str:
        return f"{self.task}-{self.arch}-{self.method}"


FIXTURE_ARCH = {"seq-cls": ("bert", ("bert.pooler", "classifier")), "token-cls": ("bert", ("classifier",)),
                "qa": ("bert", ("qa_outputs",)), "feature-extraction": ("bert", ()), "causal-lm": ("llama", ()),
                "seq2seq": ("t5", ())}
"""The architecture test_tasks.py trains each task type on, and the heads that train with the adapter
(BERT classifies from its pooler, which the seq-cls task trains too)."""

CASES = [Case(task, arch, method, heads, 4 if arch == "t5" else 2)
         for task, (arch, heads) in FIXTURE_ARCH.items() for method in ("houlsby", "pfeiffer", "parallel")] + [
    Case("seq-cls", "roberta", "houlsby", ("classifier",)),
    Case("seq-cls", "mistral", "parallel", ("score",)),
    Case("token-cls", "distilbert", "pfeiffer", ("classifier",)),
    Case("token-cls", "llama", "houlsby", ("score",)),
    Case("qa", "xlm-roberta", "parallel", ("qa_outputs",)),
    Case("qa", "gpt2", "pfeiffer", ("qa_outputs",)),
    Case("feature-extraction", "distilbert", "houlsby", ()),
    Case("causal-lm", "gpt2", "houlsby", ()),
    Case("causal-lm", "qwen3", "pfeiffer", ()),
    Case("causal-lm", "mistral", "parallel", ()),
    Case("seq2seq", "mt5", "parallel", (), 4),
    Case("seq-cls", "t5", "pfeiffer", ("classification_head",), 4),  # its head is not "classifier"
]


def site_parameters(case: Case) -> int:
    """``2 * width * b + width + b`` per site (down and up with biases), b = width // reduction factor."""
    b = WIDTH // REDUCTION[case.method]
    return case.layers * SITES_PER_LAYER[case.method] * (2 * WIDTH * b + WIDTH + b)


@pytest.mark.parametrize("case", CASES, ids=lambda case: str(case))
def test_bottleneck_adapter_trains_saves_and_rebuilds_for_the_task(
        case: Case, folders: Callable[[str, str], Path], watched: list[Watched], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder, out = folders(case.task, case.arch), tmp_path / "run"
    assert main(train(folder, out, case.task, case.method)) == 0, capsys.readouterr().err
    [run] = watched
    model = run.model.eval()

    # the loss is finite at every step and the training loss fell
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "train"]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    assert run.loss_after < run.loss_before, (run.loss_before, run.loss_after)

    # only the adapter's blocks and the task head train; all of them changed, nothing else did
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    sites = {n for n in trained if ".site_adapters.default." in n}
    heads = trained - sites
    assert sum(p.numel() for n, p in model.named_parameters() if n in sites) == site_parameters(case)
    assert {h for h in case.heads if any(n.startswith(h + ".") for n in heads)} == set(case.heads), sorted(heads)
    assert all(any(n.startswith(h + ".") for h in case.heads) for n in heads), sorted(heads)
    now = dict(model.named_parameters())
    assert now.keys() == run.before.keys()
    assert [n for n in trained if torch.equal(now[n], run.before[n])] == []
    assert [n for n in now if n not in trained and not torch.equal(now[n], run.before[n])] == []
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["reduction_factor"]) == ("BOTTLENECK", REDUCTION[case.method])

    # the run folder rebuilds the trained model: the same outputs, metrics and predictions
    task: Task = run.trainer.task
    batch = task.collate(run.trainer.eval_features)
    trained_out = outputs(model, batch)
    rebuilt, rebuilt_task, _ = rebuild(out)
    assert (outputs(rebuilt, batch) - trained_out).abs().max() <= 1e-5
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(task.evaluate(model, run.trainer.eval_features, 64), abs=1e-5)
    rows = DATA[case.task](2, 3)
    for generating in (task, rebuilt_task):  # causal-lm, seq2seq: a few tokens are enough to compare
        if hasattr(generating, "max_new_tokens"):
            generating.__dict__["max_new_tokens"] = 6
    assert rebuilt_task.predict(rebuilt, rows) == task.predict(model, rows)

    # switched off, the adapter leaves the base model (with its untrained head, as loaded)
    seed_everything(0)  # as the run did before loading the model: the same new head
    base = task.load_model(str(folder)).eval()
    with dt.disabled(model):
        assert (outputs(model, batch) - outputs(base, batch)).abs().max() <= 1e-5
    assert (trained_out - outputs(base, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("task,arch", [("seq2seq", "bart"), ("causal-lm", "opt")])
def test_a_family_without_sites_is_refused_before_anything_is_written(
        task: str, arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, out = model_folder(tmp_path / "model", task, arch), tmp_path / "run"
    assert main(train(folder, out, task, "pfeiffer")) == 2
    err = capsys.readouterr().err
    assert f"no adapter sites for model type {arch!r}" in err and "'t5'" in err and "weight-space" in err, err
    assert not (out / "run.json").exists() and not (out / "adapter").exists()
