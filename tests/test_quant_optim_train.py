"""The trainer with ``optimizer="adamw8bit"``: it learns, and checkpoint + resume equals a straight run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import StopAt, adapter_state, config, make_run

from deltatune.quant import AdamW8bit
from deltatune.train import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_adamw8bit_run_lowers_the_loss(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file, dropout=0.0)
    trainer = Trainer(model, task, train, test, config(tmp_path, max_steps=60, lr=1e-2, batch_size=16,
                                                       optimizer="adamw8bit"))
    before = trainer.evaluate()["accuracy"]
    result = trainer.fit()
    assert isinstance(trainer.optimizer, AdamW8bit)
    # the LoRA A of the 30522-token embedding table is large enough for 8-bit states
    assert any(state["exp_avg"].dtype == torch.uint8 for state in trainer.optimizer.state.values())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.metrics["accuracy"] >= 0.9 > before + 0.2


def test_adamw8bit_resume_equals_a_straight_run(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    Trainer(model, task, train, test, config(tmp_path / "straight", optimizer="adamw8bit")).fit()
    straight = adapter_state(model)

    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    crashed = Trainer(model, task, train, test, config(tmp_path / "resumed", save_every=10, optimizer="adamw8bit"),
                      callbacks=[StopAt(13)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()

    model, task, train, test = make_run(tiny_bert_dir, sentiment_file)
    resumed_run = Trainer(model, task, train, test, config(tmp_path / "resumed", save_every=10, optimizer="adamw8bit"))
    assert resumed_run.fit(resume=True).steps == 20
    resumed = adapter_state(model)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
