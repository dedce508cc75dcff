"""The prompt-space methods (``--method prompt-tuning | p-tuning | prefix-tuning``) trained by
``deltatune train`` for every task type, on the architecture test_tasks.py uses for it (BERT, LLaMA,
T5), each method in two forms: prompt tuning from a random or a text initialisation, P-tuning with
an MLP or an LSTM encoder, prefix tuning with and without ``--prefix-projection``. The loss falls,
only the prompt encoder and the task head train (the encoder's size as the method's formula says),
the run folder rebuilds the trained model, ``deltatune eval`` gives the in-memory model's metrics,
and ``dt.disabled`` gives the base model back; likewise one form each on other families (RoBERTa,
XLM-R, DistilBERT, GPT-2, Mistral, Qwen3, OPT, T5's classifier, mT5, BART: prompt methods need no
site table). A model whose attention takes no cache (DistilBERT) is refused prefix tuning with a
clear error before anything is written.

Beyond peft: prefix tuning with --gradient-checkpointing is refused before anything is written; a
decoder classifier given virtual tokens as inputs_embeds (prompt tuning, P-tuning) still reads each
row's own last token (peft pools the last position, padding for a short row).

Shared infrastructure: ``task_runs`` (the same runs as test_bottleneck_tasks)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from task_runs import (FIXTURE_ARCH, WIDTH, Watched, base_model, check_loss_fell, check_only_adapter_trained,
                       check_rebuilds, model_folder, outputs, train_args)
from task_runs import folders, watched  # noqa: F401  (fixtures, used by name)
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.train.run import rebuild
from deltatune.train.tasks.common import aligned

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

N = 4
"""--num-virtual-tokens of every run."""
INIT_TEXT = "a1 a2 a3"
"""--prompt-init-text: words of every test tokenizer's vocabulary (MiniLM's splits them)."""
LAYERS = 2
"""Transformer layers of every tiny model (per stack for T5)."""
PREFIX_KV_WIDTH = {"llama": 8 * 2, "mistral": 8 * 2, "qwen3": 8 * 2}
"""Prefix tuning's width per layer's key (and value) where it is not the model width: LLaMA's
grouped-query attention, head_dim 8 x 2 key/value heads."""


@dataclass(frozen=True)
class Form:
    """A method with its command-line options."""

    name: str
    method: str
    options: tuple[str, ...]
    hidden: int = 0
    """--encoder-hidden-size (0: not given, the default)."""

    def args(self) -> tuple[str, ...]:
        return ("--num-virtual-tokens", str(N), *self.options,
                *(("--encoder-hidden-size", str(self.hidden)) if self.hidden else ()))


FORMS = {form.name: form for form in (
    Form("prompt-random", "prompt-tuning", ()),
    Form("prompt-text", "prompt-tuning", ("--prompt-init", "text", "--prompt-init-text", INIT_TEXT)),
    Form("ptuning-mlp", "p-tuning", ("--prompt-encoder", "mlp"), hidden=16),
    Form("ptuning-lstm", "p-tuning", ("--prompt-encoder", "lstm")),
    Form("prefix", "prefix-tuning", ()),
    Form("prefix-projection", "prefix-tuning", ("--prefix-projection",), hidden=24),
    Form("prefix-projection-default", "prefix-tuning", ("--prefix-projection",)),
)}
PEFT_TYPE = {"prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING", "prefix-tuning": "PREFIX_TUNING"}


@dataclass(frozen=True)
class Case:
    task: str
    arch: str
    form: Form
    heads: tuple[str, ...]
    """The modules that train in full with the prompt encoder (the task's new head)."""

    def __str__(self) -> str:
        return f"{self.task}-{self.arch}-{self.form.name}"


CASES = [Case(task, arch, FORMS[form], heads) for task, (arch, heads) in FIXTURE_ARCH.items()
         for form in ("prompt-random", "prompt-text", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-projection")] + [
    Case(task, arch, FORMS[form], heads) for task, arch, form, heads in (
        ("seq-cls", "mistral", "prefix", ("score",)),
        ("seq-cls", "t5", "prompt-random", ("classification_head",)),
        ("seq-cls", "t5", "prefix", ("classification_head",)),
        ("seq-cls", "roberta", "prefix-projection", ("classifier",)),
        ("token-cls", "distilbert", "prompt-text", ("classifier",)),
        ("token-cls", "llama", "ptuning-mlp", ("score",)),
        ("qa", "gpt2", "prefix", ("qa_outputs",)),
        ("qa", "xlm-roberta", "ptuning-lstm", ("qa_outputs",)),
        ("feature-extraction", "distilbert", "prompt-random", ()),
        ("causal-lm", "llama", "prefix-projection-default", ()),  # h: the key/value width, as peft
        ("causal-lm", "gpt2", "prefix-projection", ()),
        ("causal-lm", "qwen3", "prefix", ()),
        ("causal-lm", "mistral", "prompt-text", ()),
        ("causal-lm", "opt", "prefix", ()),
        ("seq2seq", "mt5", "ptuning-mlp", ()),
        ("seq2seq", "bart", "prefix", ()),
        ("seq2seq", "bart", "prompt-random", ()),
    )]


def lstm_parameters(width: int, hidden: int, layers: int = 2) -> int:
    """A bidirectional ``nn.LSTM(width, hidden, layers)``: per layer and direction four gates, each
    with input and recurrent weights and two biases; layers after the first read both directions."""
    return sum(2 * (4 * hidden * ((width if layer == 0 else 2 * hidden) + hidden) + 2 * 4 * hidden)
               for layer in range(layers))


def encoder_parameters(case: Case) -> int:
    """The prompt encoder's size by its method's formula (n virtual tokens, width D, hidden h, L layers)."""
    form, kv = case.form, PREFIX_KV_WIDTH.get(case.arch, WIDTH)
    h = form.hidden or (kv if form.method == "prefix-tuning" else WIDTH)  # by default peft's token_dim
    rows = N * (2 if case.task == "seq2seq" else 1)  # an encoder-decoder's table: a set per stack
    if form.method == "prompt-tuning":
        return rows * WIDTH
    if form.name == "ptuning-mlp":
        return rows * WIDTH + (WIDTH * h + h) + (h * h + h) + (h * WIDTH + WIDTH)
    if form.name == "ptuning-lstm":
        return rows * WIDTH + lstm_parameters(WIDTH, h) + (2 * h * 2 * h + 2 * h) + (2 * h * WIDTH + WIDTH)
    if form.name == "prefix":
        return N * LAYERS * 2 * kv
    return N * kv + (kv * h + h) + (h * LAYERS * 2 * kv + LAYERS * 2 * kv)


def test_the_lstm_formula_is_torchs() -> None:
    lstm = nn.LSTM(WIDTH, 24, num_layers=2, bidirectional=True, batch_first=True)
    assert sum(p.numel() for p in lstm.parameters()) == lstm_parameters(WIDTH, 24)


def input_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``outputs``, with per-position outputs cut to the input's positions: prompt tuning and P-tuning
    make the model return ``N`` more in front (the virtual tokens'), prefix tuning and the base none."""
    inputs = {k: v for k, v in batch.items() if not k.endswith("_2") and k != "score"}
    rows, length = inputs["input_ids"].shape
    with torch.no_grad():
        out = model(**inputs)
    per_position = [aligned(v, length) if v.dim() >= 2 and v.shape[:2] == (rows, length + N) else v
                    for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return torch.cat([v.float().flatten() for v in per_position])


def text_rows(folder: Path, rows: int) -> torch.Tensor:
    """The token ids of ``INIT_TEXT`` (special tokens included) repeated or cut to ``rows``, as peft does."""
    from transformers import AutoTokenizer

    ids = list(AutoTokenizer.from_pretrained(folder)(INIT_TEXT)["input_ids"])
    return torch.tensor((ids * math.ceil(rows / len(ids)))[:rows])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_prompt_method_trains_saves_and_rebuilds_for_the_task(
        case: Case, folders: Callable[[str, str], Path], watched: list[Watched], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder, out = folders(case.task, case.arch), tmp_path / "run"
    assert main(train_args(folder, out, case.task, case.form.method, *case.form.args())) == 0, capsys.readouterr().err
    [run] = watched
    model = run.model.eval()

    check_loss_fell(out, run)

    # only the prompt encoder and the task head train; all of them changed, nothing else did
    encoder = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("site_adapters.default.")}
    check_only_adapter_trained(run, encoder, case.heads, encoder_parameters(case))
    if case.form.name == "prompt-text":  # the virtual tokens started as the text's token embeddings
        start, words = run.before["site_adapters.default.embedding.weight"], model.get_input_embeddings().weight
        assert torch.equal(start, words[text_rows(folder, len(start))])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == (PEFT_TYPE[case.form.method], N)

    # the run folder rebuilds the trained model: the same outputs, metrics and predictions
    task, batch, trained_out = check_rebuilds(out, run, case.task, capsys)

    # switched off, the prompt leaves the base model (with its untrained head, as loaded)
    base = base_model(task, folder)
    with dt.disabled(model):
        assert (outputs(model, batch) - outputs(base, batch)).abs().max() <= 1e-5
    assert (input_outputs(model, batch) - input_outputs(base, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("task", ["seq-cls", "feature-extraction"])
def test_prefix_tuning_is_refused_where_attention_takes_no_cache(
        task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, out = model_folder(tmp_path / "model", task, "distilbert"), tmp_path / "run"
    assert main(train_args(folder, out, task, "prefix-tuning", "--num-virtual-tokens", str(N))) == 2
    err = capsys.readouterr().err
    assert "takes no past_key_values" in err and "virtual tokens at the input" in err, err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_anything_is_written(
        folders: Callable[[str, str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = train_args(folders("causal-lm", "llama"), out, "causal-lm", "prefix-tuning", *FORMS["prefix"].args(),
                      "--gradient-checkpointing")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "gradient checkpointing" in err and "--gradient-checkpointing" in err, err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


@pytest.mark.parametrize("form", ["prompt-random", "ptuning-mlp", "prefix"])
def test_a_decoder_classifier_reads_each_rows_own_last_token(
        form: str, folders: Callable[[str, str], Path], tmp_path: Path) -> None:
    folder, out = folders("seq-cls", "llama"), tmp_path / "run"
    assert main(train_args(folder, out, "seq-cls", FORMS[form].method, *FORMS[form].args(), "--max-steps", "2")) == 0
    model, task, _ = rebuild(out)
    short, long = ({"input_ids": task.tokenizer(text)["input_ids"]} for text in ("a1 a2", "a9 a3 a4 a5 a6 a7"))
    with torch.no_grad():
        alone = model(**task.collate([short])).logits
        batched = model(**task.collate([short, long])).logits[:1]
    assert (alone - batched).abs().max() <= 1e-5, (alone, batched)
