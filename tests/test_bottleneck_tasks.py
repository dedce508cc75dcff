"""Bottleneck adapters (``--method houlsby|pfeiffer|parallel``) trained by ``deltatune train`` for every
task type, on the architecture test_tasks.py uses for it (BERT, LLaMA, T5) and on other families
with site tables (RoBERTa, XLM-R, DistilBERT, GPT-2, LLaMA, Mistral, Qwen3, mT5): the loss falls, only the adapter and the task head train, the run folder rebuilds the
trained model exactly, and ``dt.disabled`` gives the base model back. A model family without a site
table is refused with a clear error before anything is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from task_runs import (FIXTURE_ARCH, WIDTH, Watched, base_model, check_loss_fell, check_only_adapter_trained,
                       check_rebuilds, model_folder, outputs, train_args)
from task_runs import folders, watched  # noqa: F401  (fixtures, used by name)

import deltatune as dt
from deltatune.cli import main

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

REDUCTION = {"houlsby": 8, "pfeiffer": 16, "parallel": 4}
"""The bottleneck's hidden size / width per method: given with --reduction-factor, except pfeiffer's
16, its preset's default (parallel's default is 2)."""
SITES_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}


def train(folder: Path, out: Path, task: str, method: str) -> list[str]:
    return train_args(folder, out, task, method,
                      *(["--reduction-factor", str(REDUCTION[method])] if method != "pfeiffer" else []))


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

    check_loss_fell(out, run)

    # only the adapter's blocks and the task head train; all of them changed, nothing else did
    sites = {n for n, p in model.named_parameters() if p.requires_grad and ".site_adapters.default." in n}
    check_only_adapter_trained(run, sites, case.heads, site_parameters(case))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["reduction_factor"]) == ("BOTTLENECK", REDUCTION[case.method])

    # the run folder rebuilds the trained model: the same outputs, metrics and predictions
    task, batch, trained_out = check_rebuilds(out, run, case.task, capsys)

    # switched off, the adapter leaves the base model (with its untrained head, as loaded)
    base = base_model(task, folder)
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
