"""The task types: each trains a tiny model with LoRA and clearly improves its main metric;
their metrics against hand-computed values; bad data gets a clear error; the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from task_fixtures import (bert_folder, llama_folder, minilm_tokenizer, ner_rows, pair_rows, qa_rows, scored_pair_rows,
                           t5_folder, translation_rows, word_tokenizer)

import deltatune as dt
from deltatune.errors import DataError
from deltatune.train import TASKS, Task, TrainConfig, Trainer, rows_from, seed_everything
from deltatune.train.metrics import average_ranks, entity_scores, entity_spans, spearman, squad_exact, squad_f1, \
    squad_normalize
from deltatune.train.run import load_tokenizer


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One torch thread: these models are tiny, and on a shared 2-core machine two threads that
    wait on each other make a step ten times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- training improves the main metric ------------------------------------------------------


def train(task: Task, folder: Path, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]],
          steps: int, lr: float, out: Path, batch_size: int = 8) -> tuple[dict[str, float], dict[str, float], Any]:
    """(metrics before, metrics after, trained model) for LoRA on all linear layers plus the task head."""
    seed_everything(0)
    train_data, eval_data = rows_from(train_rows, "train"), rows_from(eval_rows, "eval")
    task.check(train_data)
    task.fit(train_data)
    model = task.load_model(str(folder))
    dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                   task_type=task.task_type, modules_to_save=task.saved_modules(model) or None))
    config = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=0.0,
                         progress=False, log_every=1000, schedule="constant")
    trainer = Trainer(model, task, task.encode(train_data), task.encode(eval_data), config)
    before = trainer.evaluate()
    result = trainer.fit()
    return before, result.metrics, model


def task_for(name: str, folder: Path, **kwargs: Any) -> Task:
    return TASKS[name](load_tokenizer(str(folder)), 64, **kwargs)


def test_causal_lm_learns_completions(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(tmp_path, "decoder")
    llama_folder(tmp_path, len(tokenizer), tokenizer.eos_token_id)
    task = task_for("causal-lm", tmp_path)
    assert task.tokenizer.pad_token == "</s>"  # the tokenizer had none: eos fills in
    data = [{"prompt": a + " =>", "completion": b} for a, b in translation_rows(160, seed=1)]
    held_out = [{"prompt": a + " =>", "completion": b} for a, b in translation_rows(32, seed=2)]
    before, after, model = train(task, tmp_path, data, held_out, steps=30, lr=1e-2, out=tmp_path / "run")
    print("causal-lm", before, after)
    assert after["neg_loss"] > before["neg_loss"] + 1.0
    assert math.isclose(after["perplexity"], math.exp(after["loss"]), rel_tol=1e-9)
    generated = task.predict(model.eval(), [{"prompt": "a1 a2 =>"}, {"messages": [{"role": "user", "content": "a3"}]}])
    assert len(generated) == 2 and all(isinstance(g, str) for g in generated)


def test_seq2seq_learns_targets(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(tmp_path, "t5")
    t5_folder(tmp_path, len(tokenizer))
    task = task_for("seq2seq", tmp_path)
    data = [{"source": a, "target": b} for a, b in translation_rows(160, seed=1)]
    held_out = [{"source": a, "target": b} for a, b in translation_rows(32, seed=2)]
    before, after, model = train(task, tmp_path, data, held_out, steps=30, lr=1e-2, out=tmp_path / "run")
    print("seq2seq", before, after)
    assert after["neg_loss"] > before["neg_loss"] + 1.0
    assert 0.0 <= after["exact_match"] <= 1.0
    assert len(task.predict(model.eval(), [{"source": "a1 a2"}])) == 1


def test_token_cls_learns_entities(tmp_path: Path) -> None:
    tokenizer = minilm_tokenizer(tmp_path)
    bert_folder(tmp_path, len(tokenizer))
    task = task_for("token-cls", tmp_path)
    before, after, model = train(task, tmp_path, ner_rows(160, seed=1), ner_rows(32, seed=2), steps=30, lr=1e-2,
                                 out=tmp_path / "run")
    print("token-cls", before, after)
    assert after["entity_f1"] > before["entity_f1"] + 0.5
    assert task.state() == {"labels": ["B-LOC", "B-PER", "I-PER", "O"]}
    tags = task.predict(model.eval(), [{"tokens": ["zorblax", "vanterpool", "visited", "ulaanbaatar"]}])
    assert len(tags[0]) == 4  # one tag per word, however many sub-tokens each word has


def test_qa_learns_spans(tmp_path: Path) -> None:
    tokenizer = minilm_tokenizer(tmp_path)
    bert_folder(tmp_path, len(tokenizer))
    task = task_for("qa", tmp_path)
    before, after, model = train(task, tmp_path, qa_rows(160, seed=1), qa_rows(32, seed=2), steps=60, lr=1e-2,
                                 out=tmp_path / "run")
    print("qa", before, after)
    assert after["f1"] > before["f1"] + 0.4
    answer = task.predict(model.eval(), [{"question": "What color is the boat?",
                                          "context": "today, the boat was pale green; and the friend."}])
    assert isinstance(answer[0], str)


@pytest.mark.parametrize("scored", [False, True])
def test_feature_extraction_learns_pairs(tmp_path: Path, scored: bool) -> None:
    tokenizer = word_tokenizer(tmp_path, "encoder")
    bert_folder(tmp_path, len(tokenizer))
    task = task_for("feature-extraction", tmp_path)
    rows = scored_pair_rows if scored else pair_rows
    # low rates: higher ones make this tiny random encoder collapse every embedding onto one direction
    steps, lr = (100, 2e-3) if scored else (120, 5e-3)
    before, after, model = train(task, tmp_path, rows(160, 1), rows(64, 2), steps=steps, lr=lr, out=tmp_path / "run")
    print("feature-extraction", scored, before, after)
    metric = "spearman" if scored else "accuracy_at_1"
    assert task.metric == metric
    assert after[metric] > before[metric] + 0.3
    vectors = task.predict(model.eval(), [{"text": "a1 a2"}, {"text": "b1 b2"}])
    assert len(vectors) == 2 and len(vectors[0]) == 32
