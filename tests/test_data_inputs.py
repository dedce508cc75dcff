"""Training data from pandas DataFrames, ``datasets`` objects (Dataset, DatasetDict, IterableDataset) and
folders ``save_to_disk`` wrote: rows, splits, the command line, and streamed training without loading it whole."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import sentiment_rows, train_command

from deltatune import LoraConfig, attach
from deltatune.cli import main
from deltatune.errors import DataError, TrainingError
from deltatune.hf import load_tokenizer
from deltatune.train import TrainConfig, Trainer, read_rows, rows_from, splits_from, stream_features
from deltatune.train.distributed import World
from deltatune.train.stream import StreamBatches
from deltatune.train.tasks import task_class

datasets = pytest.importorskip("datasets")  # a test dependency; the library itself never needs it
pd = pytest.importorskip("pandas")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]


def test_a_data_frame_gives_the_rows_of_its_records() -> None:
    rows = sentiment_rows(6, 0)
    frame = pd.DataFrame(rows).assign(stars=range(6))
    got = rows_from(frame, "frame")
    assert got.rows == [{**row, "stars": i} for i, row in enumerate(rows)]
    assert all(type(row["stars"]) is int for row in got.rows)  # plain Python values, not numpy scalars
    assert got.where(2) == "frame, row 3"


def test_a_data_frame_null_label_is_named_like_a_file_row() -> None:
    from deltatune.train.data import drop_null_rows

    frame = pd.DataFrame({"text": ["a", "b"], "score": [1.0, float("nan")]})
    with pytest.raises(DataError, match=r"frame, row 2: column 'score' is null"):
        drop_null_rows(rows_from(frame, "frame"), ["score"], skip_bad_rows=False)


def test_a_dataset_gives_its_rows_with_class_label_names() -> None:
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    data = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=features)
    assert rows_from(data).rows == [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]


def _dataset_dict(*splits: str) -> Any:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(sentiment_rows(4 + i, i))
                                 for i, name in enumerate(splits)})


def test_a_dataset_dict_is_one_split_at_a_time() -> None:
    data = _dataset_dict("train", "validation")
    with pytest.raises(DataError, match=r"DatasetDict holding the splits \['train', 'validation'\]; pass one split"):
        rows_from(data)
    train, evaluation = splits_from(data)  # no "test" split: validation is the evaluation split
    assert train.rows == sentiment_rows(4, 0) and evaluation.rows == sentiment_rows(5, 1)
    assert evaluation.source == "split validation"
    train, evaluation = splits_from(_dataset_dict("train", "validation", "test"), eval_split="test")
    assert evaluation.rows == sentiment_rows(6, 2)
    with pytest.raises(DataError, match=r"no split 'test' or 'validation'.*\['other', 'train'\]"):
        splits_from(_dataset_dict("train", "other"))


def test_a_stream_is_refused_as_rows() -> None:
    stream = datasets.Dataset.from_list(sentiment_rows(4, 0)).to_iterable_dataset()
    with pytest.raises(DataError, match="stream_features"):
        rows_from(stream)


def test_save_to_disk_folders_read_as_rows(tmp_path: Path) -> None:
    datasets.Dataset.from_list(sentiment_rows(5, 0)).save_to_disk(tmp_path / "one")
    assert read_rows(tmp_path / "one").rows == sentiment_rows(5, 0)
    _dataset_dict("train", "test").save_to_disk(tmp_path / "dict")
    assert read_rows(tmp_path / "dict", split="test").rows == sentiment_rows(5, 1)
    with pytest.raises(DataError, match=r"holds several splits; its splits: \['test', 'train'\]"):
        read_rows(tmp_path / "dict")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one that datasets' save_to_disk wrote"):
        read_rows(tmp_path / "plain")


def test_train_takes_a_dataset_dict_folder_and_says_which_splits(
        tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "sentiment"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sentiment_rows(48, 1)),
                          "validation": datasets.Dataset.from_list(sentiment_rows(16, 2))}).save_to_disk(folder)
    assert main(train_command(tiny_bert_dir, folder, tmp_path / "run", "--max-steps", "2")) == 0
    out = capsys.readouterr().out
    assert f"48 training rows ({folder} [split train]), 16 evaluation rows ({folder} [split validation])" in out
    # --eval-file wins over the folder's own evaluation split
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(8, 3)), encoding="utf-8")
    assert main(train_command(tiny_bert_dir, folder, tmp_path / "run2", "--max-steps", "2", "--eval-file",
                              str(eval_file))) == 0
    assert f"8 evaluation rows ({eval_file})" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run"), "--data", str(folder), "--split", "train", "--threads", "1"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)


def _predictions(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]


def test_eval_and_predict_take_one_split_of_a_dataset_dict_folder(
        tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``predict --file FOLDER --split NAME`` and ``eval --data FOLDER --split NAME`` read that split as the
    datasets library itself does (load_from_disk is the oracle); a split that is not there, or a folder of
    several splits with none named, is an error naming the splits, never another split's rows."""
    from deltatune.train.commands import evaluate_run, predict_run

    folder = tmp_path / "sentiment"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sentiment_rows(48, 1)),
                          "validation": datasets.Dataset.from_list(sentiment_rows(7, 2)),
                          "test": datasets.Dataset.from_list(sentiment_rows(9, 3))}).save_to_disk(folder)
    run = tmp_path / "run"
    assert main(train_command(tiny_bert_dir, folder, run, "--max-steps", "2")) == 0
    capsys.readouterr()
    test_rows = [dict(row) for row in datasets.load_from_disk(str(folder))["test"]]
    expected = [r["prediction"] for r in predict_run(run, test_rows, threads=1)]
    assert main(["predict", str(run), "--file", str(folder), "--split", "test", "--threads", "1"]) == 0
    assert _predictions(capsys) == expected and len(expected) == 9
    saved = datasets.load_from_disk(str(folder))
    for name in ("test", "validation"):  # the run's default evaluation split is test: naming validation moves it
        rows = [dict(row) for row in saved[name]]
        predicted = [r["prediction"] for r in predict_run(run, rows, threads=1)]
        accuracy = sum(p == row["label"] for p, row in zip(predicted, rows, strict=True)) / len(rows)
        assert evaluate_run(run, str(folder), name, threads=1)["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert evaluate_run(run, "", name, threads=1)["accuracy"] == pytest.approx(accuracy, abs=1e-12)

    for argv, named in ((["predict", str(run), "--file", str(folder)], "holds several splits"),
                        (["predict", str(run), "--file", str(folder), "--split", "tset"], "has no split 'tset'"),
                        # validation exists, but the user named another split: no fallback to it
                        (["eval", str(run), "--data", str(folder), "--split", "tset"], "has no split 'tset'")):
        assert main([*argv, "--threads", "1"]) == 2
        err = capsys.readouterr().err
        assert named in err and "its splits: ['test', 'train', 'validation']" in err and "--split" in err
    assert main(["predict", str(run), "--text", "good", "--split", "test"]) == 2
    assert "no --file was given" in capsys.readouterr().err

    # a DatasetDict of one split needs no choice
    datasets.DatasetDict({"only": datasets.Dataset.from_list(test_rows)}).save_to_disk(tmp_path / "single")
    assert main(["predict", str(run), "--file", str(tmp_path / "single"), "--threads", "1"]) == 0
    assert _predictions(capsys) == expected


def test_predict_split_of_a_file_uses_the_runs_split_column(
        tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = sentiment_rows(32, 1, "train") + sentiment_rows(5, 2, "test") + sentiment_rows(6, 4, "dev")
    data = tmp_path / "all.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = tmp_path / "run"
    assert main(train_command(tiny_bert_dir, data, run, "--max-steps", "2")) == 0
    capsys.readouterr()
    from deltatune.train.commands import predict_run

    dev = [r for r in rows if r["split"] == "dev"]
    assert main(["predict", str(run), "--file", str(data), "--split", "dev", "--threads", "1"]) == 0
    assert _predictions(capsys) == [r["prediction"] for r in predict_run(run, dev, threads=1)]
    assert main(["predict", str(run), "--file", str(data), "--split", "valid", "--threads", "1"]) == 2
    assert "no row has split='valid'; values found: ['dev', 'test', 'train']" in capsys.readouterr().err


# -- streaming --------------------------------------------------------------------------------------------


class CountingRows:
    """A re-iterable stream of rows that records how many rows a pass has read so far."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows, self.read, self.passes = rows, 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.passes += 1
        for self.read, row in enumerate(self.rows, start=1):
            yield row


def _task(tiny_bert_dir: Path) -> Any:
    task = task_class("seq-cls")(load_tokenizer(str(tiny_bert_dir)), 32)
    task.fit(rows_from(sentiment_rows(16, 5)))
    return task


def test_stream_batches_follow_stream_order_and_epochs(tiny_bert_dir: Path) -> None:
    task = _task(tiny_bert_dir)
    rows = sentiment_rows(10, 1)
    listed = task.encode(rows_from(rows))
    source = CountingRows(rows)
    batches = StreamBatches(stream_features(task, source, chunk_rows=3), batch_size=4)
    # 10 rows: two whole micro-batches per pass, the last 2 rows of each pass dropped
    expected = [listed[0:4], listed[4:8], listed[0:4], listed[4:8], listed[0:4]]
    assert [batches.batch(k) for k in range(5)] == expected
    assert source.passes == 3
    assert batches.batch(1) == listed[4:8]  # going back re-reads from the start
    assert source.read <= 8 + 3  # the stream was read up to the batch (and one chunk ahead), not whole
    once = StreamBatches(stream_features(task, (row for row in rows)), batch_size=4)
    assert once.batch(1) == listed[4:8]
    with pytest.raises(TrainingError, match="pass 1 over the stream gave fewer than one micro-batch.*read only once"):
        once.batch(2)


def test_stream_batches_shard_a_global_batch_over_ranks(tiny_bert_dir: Path) -> None:
    task = _task(tiny_bert_dir)
    rows = sentiment_rows(12, 1)
    one = StreamBatches(stream_features(task, rows), batch_size=4)
    ranks = [StreamBatches(stream_features(task, rows), batch_size=2, world=World(r, 2)) for r in range(2)]
    for k in range(4):
        assert ranks[0].batch(k) + ranks[1].batch(k) == one.batch(k)


def _stream_model(tiny_bert_dir: Path, task: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = task.load_model(str(tiny_bert_dir))
    attach(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=task.saved_modules(model)
                             + ["classifier"], task_type="SEQ_CLS"))
    return model


def test_streamed_training_resumes_to_the_same_adapter(tmp_path: Path, tiny_bert_dir: Path) -> None:
    task = _task(tiny_bert_dir)
    stream = datasets.Dataset.from_list(sentiment_rows(40, 1)).to_iterable_dataset()
    with pytest.raises(TrainingError, match="set TrainConfig.max_steps"):
        Trainer(_stream_model(tiny_bert_dir, task), task, stream_features(task, stream), config=TrainConfig())

    class Interrupted(Exception):
        pass

    def interrupt(step: int) -> None:
        if step == 5:  # after the checkpoint of step 4
            raise Interrupted

    def run(folder: Path, resume: bool = False, callbacks: tuple[Any, ...] = ()) -> dict[str, torch.Tensor]:
        model = _stream_model(tiny_bert_dir, task)
        config = TrainConfig(output_dir=str(folder), max_steps=7, batch_size=8, save_every=2, progress=False, lr=1e-2)
        result = Trainer(model, task, stream_features(task, stream), config=config, callbacks=callbacks).fit(resume)
        assert result.steps == 7 and math.isfinite(result.train_loss)
        return {k: v.clone() for k, v in model.state_dict().items() if "deltas" in k}

    straight = run(tmp_path / "straight")  # 5 micro-batches per pass: 7 steps cross into a second epoch
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", callbacks=(interrupt,))
    resumed = run(tmp_path / "resumed", resume=True)
    assert straight and straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
