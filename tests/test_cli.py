"""The `deltatune` command end to end on a tiny model, its errors, and bad data files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sentiment_rows, train_command, write_jsonl
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.errors import DataError
from deltatune.train import read_rows

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_command(model, data, out, *extra, options=("--lr", "1e-2"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(tiny_bert_dir, sentiment_file, out, "--max-steps", "60", "--eval-every", "30",
                           "--lr", "2e-2")) == 0
    return out


def test_train_prints_before_and_after_and_saves(trained_run: Path) -> None:
    run = json.loads((trained_run / "run.json").read_text())
    assert run["task_state"]["labels"] == ["negative", "positive"]
    assert json.loads((trained_run / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_eval_and_predict_use_the_trained_adapter(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(trained_run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] >= 0.9
    assert main(["predict", str(trained_run), "--text", "the food was great", "--text", "an awful day"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prediction"] for line in lines] == ["positive", "negative"]


def test_merge_writes_a_folder_transformers_loads_with_the_same_outputs(
        trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.train.run import rebuild

    assert main(["merge", str(trained_run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, task, _ = rebuild(trained_run)
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(["a good day", "the worst food"], return_tensors="pt",
                                                                padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-5)
    assert merged.config.id2label == {0: "negative", 1: "positive"}


def test_inspect_reports_counts_and_per_layer_delta(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["inspect", str(trained_run)]) == 0
    out = capsys.readouterr().out
    tensors = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    assert f'"parameters": {sum(t.numel() for t in tensors.values())}' in out
    rows = [line.split() for line in out.splitlines() if line.startswith("bert.encoder.layer.0.attention.self.query")]
    assert rows and 0 < float(rows[0][3]) <= 8.0 + 1e-6 and int(rows[0][4]) <= 8  # effective rank, rank <= r


def test_yaml_config_with_flags_winning(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("max-steps: 5\nlr: 0.001\nschedule: cosine\n")
    assert main(train_args(tiny_bert_dir, sentiment_file, tmp_path / "out", "--config", str(config),
                           "--max-steps", "2")) == 0
    train = json.loads((tmp_path / "out" / "run.json").read_text())["train"]
    assert (train["max_steps"], train["schedule"], train["lr"]) == (2, "cosine", 1e-2)


@pytest.mark.parametrize("args,expected", [
    (["train", "--methd", "lora"], "did you mean --method"),
    (["train", "--schedule", "step"], "invalid choice: 'step'"),
    (["train", "--task", "nope"], "invalid choice: 'nope'"),
])
def test_bad_options_are_named_with_valid_choices(args: list[str], expected: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_bad_yaml_value_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("lr: fast\nmax_stepz: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "max_stepz" in capsys.readouterr().err  # the unknown key first, with the valid names
    config.write_text("lr: fast\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "lr='fast' is invalid: must be of type float" in capsys.readouterr().err


# -- bad data ----------------------------------------------------------------------------------

def test_missing_column_lists_the_columns_found(tmp_path: Path, tiny_bert_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"sentence": r["text"], "label": r["label"], "split": r["split"]} for r in sentiment_rows(40, 0, "train")]
    data = write_jsonl(tmp_path / "d.jsonl", rows + [{**rows[0], "split": "test"}])
    assert main(train_args(tiny_bert_dir, data, tmp_path / "o", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "['label', 'sentence', 'split']" in err and "--columns" in err
    assert main(train_args(tiny_bert_dir, data, tmp_path / "o", "--max-steps", "1", "--columns", "text=sentence")) == 0


def test_bad_json_line_is_located_or_skipped(tmp_path: Path) -> None:
    good = "".join(json.dumps(r) + "\n" for r in sentiment_rows(3, 0))
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "{not json\n" + good + "[1, 2]\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:4: not a JSON object.*--skip-bad-rows"):
        read_rows(path)
    rows = read_rows(path, skip_bad_rows=True)
    assert len(rows.rows) == 6 and [s.rsplit(":", 1)[1] for s in rows.skipped] == ["4", "8"]


def test_empty_file_and_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        read_rows(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no such data file"):
        read_rows(tmp_path / "missing.csv")


def test_csv_rows(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\ngood day,positive\n\"bad, awful\",negative\n")
    assert read_rows(tmp_path / "d.csv").rows[1] == {"text": "bad, awful", "label": "negative"}


def test_label_not_seen_in_training(tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = sentiment_rows(40, 0, "train") + [{"text": "meh", "label": "neutral", "split": "test"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(train_args(tiny_bert_dir, data, tmp_path / "o", "--max-steps", "1")) == 2
    assert "label 'neutral' was not seen in the training data; labels seen: ['negative', 'positive']" \
        in capsys.readouterr().err


# -- kill -9 and resume ------------------------------------------------------------------------

def test_kill_during_training_then_resume_gives_the_straight_result(
        tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    steps = ["--max-steps", "24", "--save-every", "4"]
    assert main(train_args(tiny_bert_dir, sentiment_file, tmp_path / "straight", *steps)) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "deltatune.cli",
                                *train_args(tiny_bert_dir, sentiment_file, killed, *steps)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-0000008":
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    assert main(train_args(tiny_bert_dir, sentiment_file, killed, *steps, "--resume")) == 0
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # the log reads as one run: what the killed run logged after its checkpoint is not repeated, tokens continue
    logs = [[{k: v for k, v in json.loads(line).items() if k != "time"} for line in (run / "metrics.jsonl").open()]
            for run in (tmp_path / "straight", killed)]
    assert logs[1] == logs[0] and [r["step"] for r in logs[1] if r["event"] == "train"] == [10, 20, 24]


def test_qlora_run_trains_on_a_4bit_base_and_merges_dense(tmp_path: Path, tiny_bert_dir: Path,
                                                         sentiment_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    from deltatune.quant import Linear4bit
    from deltatune.train.run import rebuild

    out = tmp_path / "qlora"
    # the budget of the dense run above (the trained pooler copy needs it as much there as here)
    assert main(train_args(tiny_bert_dir, sentiment_file, out, "--max-steps", "60", "--lr", "2e-2",
                           "--quantize", "nf4")) == 0
    model, _, _ = rebuild(out)
    kinds = {type(m).__name__ for m in model.modules()}
    assert any(isinstance(m, Linear4bit) for m in model.modules()), kinds
    pooler = model.get_submodule("bert.pooler")  # a module the run trains in full stays dense, its layers too
    assert not any(isinstance(m, Linear4bit) for m in pooler.modules()), kinds
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] >= 0.9
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())


@pytest.mark.parametrize("method,peft_type,extra", [
    ("dora", "LORA", ("--target-modules", "word_embeddings", "query", "value")),
    ("vera", "VERA", ("--r", "16")),  # no targets: the architecture's attention projections
    ("adalora", "ADALORA", ()),
    ("bitfit", "BITFIT", ()),  # no targets: every bias
    ("ia3", "IA3", ("--target-modules", "key", "value", "output.dense", "--feedforward-modules", "output.dense")),
    ("houlsby", "BOTTLENECK", ("--reduction-factor", "8")),
    ("pfeiffer", "BOTTLENECK", ("--adapter-scaling", "learned")),
    ("parallel", "BOTTLENECK", ("--adapter-scaling", "0.5")),
])
def test_every_method_trains_from_the_command_line(method: str, peft_type: str, extra: tuple[str, ...],
                                                   tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(tiny_bert_dir, sentiment_file, tmp_path)
    args = args[:args.index("--target-modules")] + [*extra, "--method", method, "--max-steps", "12"]
    assert main(args) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config.get("use_dora", False) == (method == "dora")
    if method == "adalora":
        assert config["total_step"] == 12 and config["rank_pattern"]  # the allocator ran and its ranks were saved
    if peft_type == "BOTTLENECK":
        assert config["mh_adapter"] == (method == "houlsby") and config["is_parallel"] == (method == "parallel")
        assert config["reduction_factor"] == {"houlsby": 8, "pfeiffer": 16, "parallel": 2}[method]
        assert config["scaling"] == {"houlsby": 1.0, "pfeiffer": "learned", "parallel": 0.5}[method]
    capsys.readouterr()
    assert main(["eval", str(tmp_path)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0


def test_adalora_resumes_after_its_ranks_were_cut(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The saved file drops pruned ranks; the checkpoint keeps the live tensors, so resume still fits."""
    from deltatune.train.trainer import Trainer

    args = train_args(tiny_bert_dir, sentiment_file, tmp_path)
    args = args[:args.index("--target-modules")] + ["--target-modules", "query", "value", "--method", "adalora",
                                                    "--max-steps", "14", "--save-every", "10"]
    original = Trainer._train_step

    def crash_at_12(self: Trainer) -> tuple[float, int]:
        if self.step == 12:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_12)
    assert main(args) == 130  # the command reports an interrupt with status 130
    monkeypatch.setattr(Trainer, "_train_step", original)
    saved = json.loads((tmp_path / "checkpoints" / "step-0000010" / "adapter" / "adapter_config.json").read_text())
    assert any(not all(mask) for mask in saved["rank_pattern"].values())  # ranks were cut by step 10
    assert main([*args, "--resume"]) == 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 14


def test_run_checkpoint_and_merged_files_follow_the_umask(tmp_path: Path, tiny_bert_dir: Path,
                                                          sentiment_file: Path) -> None:
    """Adapters, checkpoints and merged models get the mode the umask gives new files (safetensors
    alone would write 0600)."""
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert main(train_args(tiny_bert_dir, sentiment_file, out, "--max-steps", "2", "--save-every", "1")) == 0
        assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    files = [p for folder in (out, tmp_path / "merged") for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_state.safetensors" for p in files) and any(p.suffix == ".safetensors" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o640)}, modes
