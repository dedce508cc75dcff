"""The trainer: resume equivalence, NaN stop, gradient checkpointing, bf16, early stopping, schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.errors import ConfigError, TrainingError
from deltatune.io import adapter_tensors
from deltatune.train import Rows, TrainConfig, Trainer, read_rows, split_rows
from deltatune.train.checkpoint import latest_checkpoint
from deltatune.train.tasks.seq_cls import SequenceClassification
from deltatune.train.trainer import seed_everything

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_run(model_dir: Path, data: Path, dropout: float = 0.1) -> tuple[nn.Module, SequenceClassification,
                                                                           list[Any], list[Any]]:
    """Model + task + features exactly as a run builds them (seeded, so two calls agree)."""
    from transformers import AutoTokenizer

    seed_everything(0)
    rows = read_rows(data)
    train, test = split_rows(rows, "split", "train"), split_rows(rows, "split", "test")
    task = SequenceClassification(AutoTokenizer.from_pretrained(model_dir), max_length=32)
    task.fit(train)
    model = task.load_model(str(model_dir))
    # LoRA on the embedding table too: a random tiny BERT learns the task through it in a few dozen steps.
    dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                   target_modules=["word_embeddings", "query", "value"], task_type="SEQ_CLS"))
    return model, task, task.encode(train), task.encode(test)


def config(tmp: Path, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = {"output_dir": str(tmp), "max_steps": 20, "batch_size": 8, "lr": 5e-3,
                            "progress": False, "log_every": 5}
    return TrainConfig(**{**base, **changes})


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: t.detach().clone() for k, t in adapter_tensors(model, "default").items()}


class StopAt:
    """A step callback that kills the run (as a crash would) once ``step`` is reached."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def test_resume_after_a_crash_equals_a_straight_run(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    Trainer(model, task, train, test, config(tmp_path / "straight", grad_accum=2)).fit()
    straight = adapter_state(model)

    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    crashed = Trainer(model, task, train, test, config(tmp_path / "resumed", grad_accum=2, save_every=10),
                      callbacks=[StopAt(13)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-0000010"  # type: ignore[union-attr]

    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    result = Trainer(model, task, train, test, config(tmp_path / "resumed", grad_accum=2, save_every=10)).fit(resume=True)
    assert result.steps == 20
    resumed = adapter_state(model)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_training_improves_accuracy_and_writes_logs(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file, dropout=0.0)
    trainer = Trainer(model, task, train, test, config(tmp_path, max_steps=60, eval_every=30, lr=1e-2, batch_size=16))
    before = trainer.evaluate()["accuracy"]
    result = trainer.fit()
    assert result.metrics["accuracy"] >= 0.9 > before + 0.2
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(5, 61, 5))
    assert [e["step"] for e in events if e["event"] == "eval"] == [30, 60]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "best" / "adapter_config.json").is_file()


class NanAfter(SequenceClassification):
    """A task whose loss becomes NaN from the ``n``-th call on."""

    def __init__(self, base: SequenceClassification, n: int) -> None:
        self.__dict__.update(base.__dict__)
        self.calls, self.n = 0, n

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * math.nan if self.calls >= self.n else loss


def test_nan_loss_stops_without_applying_the_update(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    trainer = Trainer(model, NanAfter(task, 8), train, test, config(tmp_path, save_every=5))
    with pytest.raises(TrainingError, match=r"became nan at step 8.*last good checkpoint is .*step-0000005"):
        trainer.fit()
    assert trainer.step == 7
    assert all(torch.isfinite(t).all() for t in adapter_tensors(model, "default").values())
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000005"  # type: ignore[union-attr]


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_checkpointing_trains_the_adapter_of_a_frozen_base(
        tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path, bf16: bool) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file, dropout=0.0)
    before = adapter_state(model)
    Trainer(model, task, train, test, config(tmp_path, max_steps=3, gradient_checkpointing=True, bf16=bf16)).fit()
    after = adapter_state(model)
    b_keys = [k for k in before if "lora_B" in k]
    assert b_keys and all(not torch.equal(before[k], after[k]) for k in b_keys)


def test_checkpointed_loss_equals_plain_loss(tiny_bert_dir: Path, sentiment_file: Path) -> None:
    from deltatune.train.trainer import enable_gradient_checkpointing

    model, task, train, _ = make_run(tiny_bert_dir, sentiment_file, dropout=0.0)
    batch = task.collate(train[:8])
    model.train()
    torch.manual_seed(1)  # the same dropout masks in both passes
    plain = task.loss(model, batch)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    enable_gradient_checkpointing(model)
    torch.manual_seed(1)
    checkpointed = task.loss(model, batch)
    checkpointed.backward()
    assert torch.allclose(plain, checkpointed, atol=1e-6)
    assert grads and all(torch.allclose(grads[n], p.grad, atol=1e-6)
                         for n, p in model.named_parameters() if n in grads and p.grad is not None)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    result = Trainer(model, task, train, test, config(tmp_path, lr=1e-12, eval_every=2, early_stopping=2)).fit()
    assert result.stopped_early and result.steps == 6  # best at 2, no gain at 4 and 6


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("batch_size", 0), ("schedule", "step"),
                                         ("warmup_ratio", 1.0), ("early_stopping", 3)])
def test_bad_train_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_too_few_examples_for_a_batch_is_a_clear_error(tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, _ = make_run(tiny_bert_dir, sentiment_file)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        Trainer(model, task, train[:3], config=TrainConfig(batch_size=8))


def test_a_model_without_an_adapter_is_refused(tiny_bert_dir: Path, sentiment_file: Path) -> None:
    _, task, train, _ = make_run(tiny_bert_dir, sentiment_file)
    frozen = task.load_model(str(tiny_bert_dir)).requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        Trainer(frozen, task, train)


def test_rows_object_keeps_its_source() -> None:
    rows = Rows([{"a": 1}], "mem")
    assert rows.source == "mem" and rows.skipped == []


def test_a_fresh_run_clears_an_earlier_runs_checkpoints(tmp_path: Path, tiny_bert_dir: Path,
                                                         sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    Trainer(model, task, train, test, config(tmp_path, max_steps=4, save_every=2)).fit()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000004"  # type: ignore[union-attr]
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    crashed = Trainer(model, task, train, test, config(tmp_path, max_steps=4, save_every=2), callbacks=[StopAt(1)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert latest_checkpoint(tmp_path / "checkpoints") is None  # nothing of the first run is left to resume
    assert not (tmp_path / "metrics.jsonl").exists()
