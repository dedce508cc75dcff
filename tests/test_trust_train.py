"""Trust in training runs: bad data cells, failures that leave the run folder as it was, divergence
caught before anything is saved from it, one run per folder, and a resumed run's log reading as one."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import sentiment_rows, train_command, write_jsonl
from safetensors.torch import load_file, save_file
from test_train import StopAt, config, make_run
from torch import Tensor, nn

from deltatune.cli import main
from deltatune.errors import ConfigError, DataError, TrainingError
from deltatune.train import Trainer, TrainConfig, read_rows, rows_from, split_rows
from deltatune.train.checkpoint import LATEST, LIVE_FILE, latest_checkpoint
from deltatune.train.labels import LabelSet
from deltatune.train.lock import LOCK_FILE, own_folder
from deltatune.train.progress import rewind_log
from deltatune.train.tasks.seq_cls import SequenceClassification
from deltatune.train.trainer import divergence, trainable

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_command(model, data, out, "--max-steps", "2", *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes: equal snapshots mean an untouched folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str, start: str) -> str:
    """The command's last stderr line, which must be its error, with no traceback anywhere."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(start), err
    return last


# -- 1. data cells ----------------------------------------------------------------------------

def labelled_file(tmp_path: Path, bad: dict[str, Any], name: str = "d.jsonl") -> tuple[Path, int]:
    """40 training rows + 8 test rows with ``bad`` as the 6th line; returns (file, that line)."""
    rows: list[dict[str, Any]] = [*sentiment_rows(40, 0, "train"), *sentiment_rows(8, 1, "test")]
    rows[5] = {**rows[5], **bad}
    return write_jsonl(tmp_path / name, rows), 6


@pytest.mark.parametrize("column", ["label", "text"])
def test_a_null_cell_names_file_and_line_or_is_skipped(column: str, tmp_path: Path, tiny_bert_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data, line = labelled_file(tmp_path, {column: None})
    out = tmp_path / "run"
    assert main(train_args(tiny_bert_dir, data, out)) == 2
    err = one_error_line(capsys.readouterr().err, "deltatune train: error:")
    assert f"d.jsonl:{line}: column {column!r} is null (no value)" in err and "--skip-bad-rows" in err
    assert not out.exists()  # the failed command left nothing behind

    assert main(train_args(tiny_bert_dir, data, out, "--skip-bad-rows")) == 0
    assert f"skipped 1 bad line(s) in {data} [split=train], first at {data}:{line}" in capsys.readouterr().out
    labels = json.loads((out / "run.json").read_text())["task_state"]["labels"]
    assert labels == ["negative", "positive"]  # no class "None"


def test_the_task_itself_refuses_null_and_non_text_cells(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Library users who call fit/encode directly get the same refusal, with file and line."""
    from transformers import AutoTokenizer

    task = SequenceClassification(AutoTokenizer.from_pretrained(tiny_bert_dir), max_length=32)
    data, line = labelled_file(tmp_path, {"label": None})
    with pytest.raises(DataError, match=rf"d.jsonl:{line}: the label is null"):
        task.fit(split_rows(read_rows(data), "split", "train"))
    task.fit(rows_from(sentiment_rows(8, 0)))
    data, line = labelled_file(tmp_path, {"text": 3}, "n.jsonl")
    with pytest.raises(DataError, match=rf"n.jsonl:{line}: column 'text' must hold text, found int 3"):
        task.encode(read_rows(data))


def test_labels_of_mixed_types_are_an_error_not_one_class(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": "1"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    data = read_rows(path)
    cells = [(r["label"], data.where(i)) for i, r in enumerate(data.rows)]
    with pytest.raises(DataError, match=r"mixed.jsonl:3: label '1' \(text\) and label 1 at .*mixed.jsonl:1 "
                                        r"\(integer\) mix types.*all quoted, or all integers"):
        LabelSet.learn(cells, data.source)
    assert LabelSet.learn(cells[:2], data.source).names == ["0", "1"]  # one type: fine
    with pytest.raises(DataError, match="mix types"):
        LabelSet.learn([(1, "a"), (1.0, "b")], "s")  # 1 and 1.0 would be two classes


def test_invalid_utf8_names_file_and_line_or_is_skipped(tmp_path: Path) -> None:
    good = json.dumps({"text": "fine", "label": "positive"}).encode() + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good * 2 + b'{"text": "caf\xe9", "label": "negative"}\n' + good)
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 14\)\. "
                                        r"Save the file as UTF-8, or pass --skip-bad-rows"):
        read_rows(path)
    rows = read_rows(path, skip_bad_rows=True)
    assert len(rows.rows) == 3 and rows.skipped == [f"{path}:3"] and rows.where(2) == f"{path}:4"

    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b"text,label\ngood,positive\n\xff\xfe,negative\nbad,negative\n")
    with pytest.raises(DataError, match=r"bad.csv:3: not valid UTF-8 \(byte 0xff at column 1\)"):
        read_rows(csv_path)
    rows = read_rows(csv_path, skip_bad_rows=True)
    assert [r["text"] for r in rows.rows] == ["good", "bad"] and rows.skipped == [f"{csv_path}:3"]
    assert rows.where(1) == f"{csv_path}:4"


# -- 2. failures with one clear line, exit 2, the run folder as it was --------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(train_args(tiny_bert_dir, sentiment_file, out)) == 0
    return out


def test_output_dir_that_is_a_file(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "x"
    target.write_text("keep me")
    assert main(train_args(tiny_bert_dir, sentiment_file, target)) == 2
    err = one_error_line(capsys.readouterr().err, "deltatune train: error: TrainConfig.output_dir=")
    assert "is an existing file, not a folder" in err and "Fix:" in err
    assert target.read_text() == "keep me"


def test_merge_output_that_is_a_file(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "merged"
    target.write_text("keep me")
    before = snapshot(finished_run)
    assert main(["merge", str(finished_run), "--output", str(target)]) == 2
    err = one_error_line(capsys.readouterr().err, "deltatune merge: error:")
    assert "output=" in err and "is an existing file, not a folder" in err
    assert target.read_text() == "keep me" and snapshot(finished_run) == before


def test_eval_of_a_corrupt_run_file(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "run.json").write_text('{"model": "m",\n  "options": {')
    before = snapshot(run)
    assert main(["eval", str(run)]) == 2
    err = one_error_line(capsys.readouterr().err, "deltatune eval: error:")
    assert "run.json:2: not valid JSON" in err and "train the run again" in err
    (run / "run.json").write_text('{"model": "m"}')
    assert main(["eval", str(run)]) == 2
    assert "'task_state' is missing" in one_error_line(capsys.readouterr().err, "deltatune eval: error:")
    assert snapshot(run) == {**before, "run.json": b'{"model": "m"}'}


@pytest.mark.parametrize("lr", ["1e38", "1e10", "inf", "-1"])
def test_absurd_learning_rates_are_refused_at_start(lr: str, tmp_path: Path, tiny_bert_dir: Path,
                                                    sentiment_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_args(tiny_bert_dir, sentiment_file, tmp_path / "o", "--lr", lr)) == 2
    err = one_error_line(capsys.readouterr().err, "deltatune train: error: TrainConfig.lr=")
    assert "Fix:" in err
    assert not (tmp_path / "o").exists()


def test_disk_full_while_writing_a_checkpoint(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                              capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import deltatune.train.checkpoint as checkpoint

    calls = []

    def full_on_second_checkpoint(tensors: dict[str, Tensor], path: Path, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")  # what a write cut short by a full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_on_second_checkpoint)
    out = tmp_path / "run"
    args = train_args(tiny_bert_dir, sentiment_file, out, "--max-steps", "6", "--save-every", "2")
    assert main(args) == 2
    err = one_error_line(capsys.readouterr().err, "deltatune train: error: cannot write checkpoint")
    assert "step-0000004: No space left on device (errno 28)" in err
    assert "step-0000002, is intact" in err and "--resume" in err
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-0000002"]  # no staging folder left
    assert (root / LATEST).read_text().strip() == "step-0000002"
    assert not (out / "adapter").exists() and not (out / LOCK_FILE).exists()
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0  # the kept checkpoint resumes
    assert (root / LATEST).read_text().strip() == "step-0000006"


# -- 3. divergence --------------------------------------------------------------------------

def test_divergence_criterion() -> None:
    cfg = TrainConfig()  # max_norm_growth 10, max_param_value 1e4
    assert divergence(12.0, 100.0, 3.0, cfg) == ""  # 8.3x: large, but under 10x
    assert "grew more than max_norm_growth=10x in one update (from 12 to 130)" in divergence(12.0, 130.0, 3.0, cfg)
    assert divergence(0.0, 9.0, 3.0, cfg) == ""  # a norm below 1 counts as 1 (zero-initialised adapters)
    assert divergence(0.0, 11.0, 3.0, cfg) != ""
    assert "exceeded max_param_value=10000 in magnitude (reached 5e+17)" in divergence(5e17, 5e17, 5e17, cfg)
    assert "became nan" in divergence(1.0, math.nan, math.nan, cfg)
    assert "became inf" in divergence(1.0, math.inf, math.inf, cfg)
    off = TrainConfig(max_norm_growth=0, max_param_value=0)
    assert divergence(1.0, 1e9, 1e9, off) == "" and divergence(1.0, 1.0, math.nan, off) != ""
    with pytest.raises(ConfigError, match="max_norm_growth"):
        TrainConfig(max_norm_growth=0.5)


class Explode(SequenceClassification):
    """A task whose loss is multiplied by ``factor`` from the ``n``-th call on: finite, but with SGD an
    update that blows the weights up, as an absurd learning rate does."""

    def __init__(self, base: SequenceClassification, n: int, factor: float) -> None:
        self.__dict__.update(base.__dict__)
        self.calls, self.n, self.factor = 0, n, factor

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * self.factor if self.calls >= self.n else loss


def assert_sane_checkpoints(root: Path, bound: float) -> None:
    for folder in root.glob("step-*"):
        for tensor in load_file(folder / LIVE_FILE).values():
            assert torch.isfinite(tensor).all() and tensor.abs().max() <= bound, folder


def test_an_exploding_update_stops_before_anything_is_saved(tmp_path: Path, tiny_bert_dir: Path,
                                                            sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    optimizer = torch.optim.SGD(trainable(model), lr=1e-2)
    trainer = Trainer(model, Explode(task, 4, 1e12), train, test,
                      config(tmp_path, save_every=1, max_grad_norm=0.0, eval_every=1), optimizer=optimizer)
    with pytest.raises(TrainingError, match=r"norm grew more than max_norm_growth=10x in one update .* at step 4; "
                                            r"the update is in the model in memory, but nothing was saved from it .*"
                                            r"the last good checkpoint is .*step-0000003"):
        trainer.fit()
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "step-0000003"  # type: ignore[union-attr]
    assert not (root / "step-0000004").exists() and not (tmp_path / "adapter").exists()
    assert_sane_checkpoints(root, 1e4)
    best = load_file(tmp_path / "best" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e4 for t in best.values())


def test_a_slow_blow_up_is_caught_by_the_magnitude_bound(tmp_path: Path, tiny_bert_dir: Path,
                                                         sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    optimizer = torch.optim.SGD(trainable(model), lr=1e-2)
    trainer = Trainer(model, Explode(task, 3, 1e5), train, test,
                      config(tmp_path, save_every=1, max_grad_norm=0.0, max_norm_growth=0, max_param_value=50.0),
                      optimizer=optimizer)
    with pytest.raises(TrainingError, match=r"exceeded max_param_value=50 in magnitude .* at step \d+;"):
        trainer.fit()
    assert_sane_checkpoints(tmp_path / "checkpoints", 50.0)
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step-{trainer.step:07d}"  # type: ignore[union-attr]


class InfGradient(torch.autograd.Function):
    """0 forward, an infinite gradient backward: a finite loss whose update would break the weights."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full(ctx.shape, math.inf)


def test_an_infinite_gradient_is_not_applied(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    head = trainable(model)[0]
    calls = []

    def term() -> Tensor:
        calls.append(1)
        return InfGradient.apply(head) if len(calls) == 3 else head.sum() * 0

    snapshots: list[Tensor] = []
    trainer = Trainer(model, task, train, test, config(tmp_path, save_every=1), loss_terms=[term],
                      callbacks=[lambda step: snapshots.append(head.detach().clone())])
    with pytest.raises(TrainingError, match=r"the gradient norm became (inf|nan) at step 3; the update was not "
                                            r"applied .*last good checkpoint is .*step-0000002"):
        trainer.fit()
    assert torch.equal(head, snapshots[-1])  # still the weights of step 2


def test_nan_loss_message_converts_without_autograd_warning(tmp_path: Path, tiny_bert_dir: Path,
                                                           sentiment_file: Path) -> None:
    from test_train import NanAfter

    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    trainer = Trainer(model, NanAfter(task, 2), train, test, config(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError, match="became nan at step 2"):
            trainer.fit()
    assert not [w for w in caught if "requires_grad=True to a scalar" in str(w.message)]


def test_resuming_from_a_diverged_checkpoint_is_refused(tmp_path: Path, tiny_bert_dir: Path,
                                                        sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    Trainer(model, task, train, test, config(tmp_path, max_steps=4, save_every=2)).fit()
    live = tmp_path / "checkpoints" / "step-0000004" / LIVE_FILE
    save_file({k: t * 1e17 for k, t in load_file(live).items()}, live)  # as an older version could write
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    with pytest.raises(TrainingError, match=r"step-0000004 is not a good checkpoint: a trainable parameter exceeded"):
        Trainer(model, task, train, test, config(tmp_path, max_steps=6, save_every=2)).fit(resume=True)


# -- 4. one run per folder --------------------------------------------------------------------

def test_a_second_run_on_a_folder_in_use_is_refused(finished_run: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                                    tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from deltatune.train.lock import own_folder\n"
                               "with own_folder(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); sys.stdin.read()", str(run)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with_lock = snapshot(run)
        second = subprocess.run([sys.executable, "-m", "deltatune.cli", *train_args(tiny_bert_dir, sentiment_file, run)],
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert second.returncode == 2, second.stderr
        err = one_error_line(second.stderr, "deltatune train: error: TrainConfig.output_dir=")
        assert f"another training run (process {holder.pid}) is using it" in err and "--output-dir" in err
        assert snapshot(run) == with_lock  # the refused run changed nothing
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert snapshot(run) == before  # the lock file went with the run that held it


def test_the_lock_is_reentrant_released_and_never_stale(tmp_path: Path, tiny_bert_dir: Path,
                                                        sentiment_file: Path) -> None:
    fcntl = pytest.importorskip("fcntl")  # the lock itself is msvcrt's on Windows
    run = tmp_path / "run"
    with own_folder(run), own_folder(run):  # deltatune train holds it, Trainer.fit takes it again
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not run.exists()  # created for the run, left empty: removed again
    run.mkdir()
    with (run / LOCK_FILE).open("w") as f:  # a killed run leaves its (unlocked) lock file behind
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another training run"):
            with own_folder(run):
                pass
    assert main(train_args(tiny_bert_dir, sentiment_file, run)) == 0  # the kernel dropped the lock with the file
    assert not (run / LOCK_FILE).exists() and (run / "adapter").is_dir()


# -- 5. a resumed run's log ---------------------------------------------------------------

def events(folder: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl without their wall-clock time."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_resumed_log_reads_as_one_run(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    cfg: dict[str, Any] = {"max_steps": 12, "log_every": 3, "eval_every": 6}
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    Trainer(model, task, train, test, config(tmp_path / "straight", **cfg)).fit()

    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    crashed = Trainer(model, task, train, test, config(tmp_path / "resumed", save_every=4, **cfg),
                      callbacks=[StopAt(11)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()  # killed at step 11: steps 9 and 10 were logged after the checkpoint of step 8
    assert max(r["step"] for r in events(tmp_path / "resumed")) == 9
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    Trainer(model, task, train, test, config(tmp_path / "resumed", save_every=4, **cfg)).fit(resume=True)

    straight, resumed = events(tmp_path / "straight"), events(tmp_path / "resumed")
    assert resumed == straight  # steps, losses (the window since the last log), lr, tokens, evaluations
    train_records = [r for r in resumed if r["event"] == "train"]
    steps, tokens = [r["step"] for r in train_records], [r["tokens"] for r in train_records]
    assert steps == [3, 6, 9, 12] and tokens == sorted(set(tokens))


def test_rewind_log_keeps_the_checkpoints_records(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "train", "step": s}) for s in (2, 4, 6)]
    log.write_text("\n".join(lines) + '\n{"event": "tr')  # the last line cut by a kill
    assert rewind_log(log, 2, 4) == 2 and log.read_text().splitlines() == lines[:2]
    log.write_text("\n".join(lines) + '\n{"event": "tr')
    assert rewind_log(log, None, 4) == 2 and log.read_text().splitlines() == lines[:2]  # an older checkpoint
    assert not list(tmp_path.glob(".*"))  # no temporary file left
