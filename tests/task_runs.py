"""A ``deltatune train`` run per task type, watched: the tiny model folders, data and helpers that
the per-method task tests (test_bottleneck_tasks, test_prompt_tasks) share.

``folders`` and ``watched`` are pytest fixtures: a test module imports them by name to use them."""

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

import deltatune.train.run as run_module
from deltatune.train import Trainer

Rows = list[dict[str, Any]]
WIDTH = 32
"""The hidden size of every tiny model here."""
STEPS = 6
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

FIXTURE_ARCH = {"seq-cls": ("bert", ("bert.pooler", "classifier")), "token-cls": ("bert", ("classifier",)),
                "qa": ("bert", ("qa_outputs",)), "feature-extraction": ("bert", ()), "causal-lm": ("llama", ()),
                "seq2seq": ("t5", ())}
"""The architecture test_tasks.py trains each task type on, and the heads that train with the adapter
(BERT classifies from its pooler, which the seq-cls task trains too)."""


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


def train_args(folder: Path, out: Path, task: str, method: str, *options: str) -> list[str]:
    """``deltatune train`` arguments: ``STEPS`` steps at a constant lr 1e-2 on 16 rows of ``task``'s data
    (4 more to evaluate, written next to ``out``), then the method's ``options``."""
    data = DATA[task]
    return ["train", "--task", task, "--model", str(folder), "--method", method,
            "--train-file", write(out.parent / f"{out.name}-train.jsonl", data(16, 1)),
            "--eval-file", write(out.parent / f"{out.name}-eval.jsonl", data(4, 2)), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", "8", "--lr", "1e-2", "--schedule", "constant",
            "--warmup-ratio", "0", "--log-every", "1", "--max-length", "48", "--threads", "1", "--no-progress",
            *options]


def train_losses(out: Path) -> list[float]:
    """The logged training loss of every step of the run in ``out``."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [event["loss"] for event in events if event["event"] == "train"]


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


def check_rebuilds(out: Path, run: Watched, task_name: str, capsys: pytest.CaptureFixture[str]
                   ) -> tuple[Any, dict[str, Tensor], Tensor]:
    """The run folder rebuilds the trained model: the same outputs (within 1e-5), the same metrics
    from ``deltatune eval`` and the same predictions. Returns (the task, an evaluation batch, the
    trained model's outputs on it)."""
    from deltatune.cli import main
    from deltatune.train.run import rebuild

    model, task = run.model, run.trainer.task
    batch = task.collate(run.trainer.eval_features)
    trained_out = outputs(model, batch)
    rebuilt, rebuilt_task, _ = rebuild(out)
    assert (outputs(rebuilt, batch) - trained_out).abs().max() <= 1e-5
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(task.evaluate(model, run.trainer.eval_features, 64), abs=1e-5)
    rows = DATA[task_name](2, 3)
    for generating in (task, rebuilt_task):  # causal-lm, seq2seq: a few tokens are enough to compare
        if hasattr(generating, "max_new_tokens"):
            generating.__dict__["max_new_tokens"] = 6
    assert rebuilt_task.predict(rebuilt, rows) == task.predict(model, rows)
    return task, batch, trained_out


def base_model(task: Any, folder: Path) -> nn.Module:
    """The base model as the run loaded it: seeded as the run was, so with the same new head."""
    from deltatune.train import seed_everything

    seed_everything(0)
    return task.load_model(str(folder)).eval()


def check_loss_fell(out: Path, run: Watched) -> None:
    """The loss is finite at every logged step and the training loss fell."""
    losses = train_losses(out)
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    assert run.loss_after < run.loss_before, (run.loss_before, run.loss_after)


def check_only_adapter_trained(run: Watched, adapter: set[str], heads: tuple[str, ...], count: int) -> None:
    """Only the adapter's parameters (``adapter``, ``count`` values in all) and the task ``heads`` train;
    all of them changed, nothing else did."""
    model = run.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    others = trained - adapter
    assert sum(p.numel() for n, p in model.named_parameters() if n in adapter) == count
    assert {h for h in heads if any(n.startswith(h + ".") for n in others)} == set(heads), sorted(others)
    assert all(any(n.startswith(h + ".") for h in heads) for n in others), sorted(others)
    now = dict(model.named_parameters())
    assert now.keys() == run.before.keys()
    assert [n for n in trained if torch.equal(now[n], run.before[n])] == []
    assert [n for n in now if n not in trained and not torch.equal(now[n], run.before[n])] == []
