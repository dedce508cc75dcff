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
    # one- and two-word sources, so that a few dozen steps already get some generations exactly right
    data = [{"source": a, "target": b} for a, b in translation_rows(160, seed=1, lengths=(1, 2))]
    held_out = [{"source": a, "target": b} for a, b in translation_rows(32, seed=2, lengths=(1, 2))]
    before, after, model = train(task, tmp_path, data, held_out, steps=60, lr=1e-2, out=tmp_path / "run")
    print("seq2seq", before, after)
    assert after["neg_loss"] > before["neg_loss"] + 1.0
    assert after["exact_match"] > before["exact_match"]
    # evaluation's exact match is the share of predictions that equal the target
    predicted = task.predict(model.eval(), held_out)
    assert after["exact_match"] == sum(p == r["target"] for p, r in zip(predicted, held_out)) / len(held_out)


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


# -- metrics against hand-computed values ------------------------------------------------------


def test_entity_spans_read_bio_like_conlleval() -> None:
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-PER"]) == [(0, 1, "PER"), (3, 4, "LOC"),
                                                                              (5, 5, "PER")]
    assert entity_spans(["O", "I-PER", "I-PER"]) == [(1, 2, "PER")]  # a stray I- starts an entity
    assert entity_spans(["B-PER", "B-PER", "I-PER"]) == [(0, 0, "PER"), (1, 2, "PER")]
    assert entity_spans(["O", "O"]) == []


def test_entity_scores_count_only_exact_spans() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG"], ["O", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"],  # PER cut short (a miss and a false alarm), LOC right
                 ["B-ORG", "I-ORG"],  # right
                 ["B-PER", "O"]]  # false alarm
    # tp 2 (LOC, ORG), fp 2 (short PER, stray PER), fn 1 (the full PER)
    scores = entity_scores(predicted, gold)
    assert scores == pytest.approx({"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7})
    assert entity_scores([["B-LOC"]], [["B-ORG"]])["f1"] == 0.0  # right span, wrong type


def test_squad_normalisation_and_scores() -> None:
    assert squad_normalize("The  Quick, brown fox!") == "quick brown fox"
    assert squad_normalize("an apple a day") == "apple day"
    assert squad_exact("Paris.", "paris") == 1.0
    assert squad_exact("in Paris", "Paris") == 0.0
    assert squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P 2/2, R 2/3
    assert squad_f1("dog", "cat") == 0.0
    assert squad_f1("", "") == 1.0 and squad_f1("cat", "") == 0.0  # "no answer" matches only itself


def test_spearman_averages_tied_ranks() -> None:
    assert average_ranks([5, 1, 5, 3]) == [3.5, 1.0, 3.5, 2.0]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]: cov 4.5, var 4.5 and 5 -> sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0  # nothing to correlate


# -- encoding details --------------------------------------------------------------------------


def test_causal_lm_labels_only_the_completion(tmp_path: Path) -> None:
    word_tokenizer(tmp_path, "decoder")
    task = task_for("causal-lm", tmp_path)
    tok = task.tokenizer
    features = task.encode(rows_from([{"prompt": "a1 a2 =>", "completion": "b1 b2"},
                                      {"prompt": "a3 =>", "completion": "b3"}]))
    assert features[0]["labels"] == [-100, -100, -100, *tok.convert_tokens_to_ids(["b1", "b2"]), tok.eos_token_id]
    batch = task.collate(features)
    assert batch["labels"][1].tolist() == [-100, -100, *tok.convert_tokens_to_ids(["b3"]), tok.eos_token_id, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]


def test_causal_lm_chat_without_template_labels_assistant_turns(tmp_path: Path) -> None:
    word_tokenizer(tmp_path, "decoder")
    task = task_for("causal-lm", tmp_path)
    chat = [{"role": "user", "content": "a1"}, {"role": "assistant", "content": "b1"},
            {"role": "user", "content": "a2"}, {"role": "assistant", "content": "b2 b3"}]
    feature = task.encode(rows_from([{"messages": chat}]))[0]
    tok = task.tokenizer
    assert tok.decode(feature["input_ids"]) == "user: a1 assistant: b1 </s> user: a2 assistant: b2 b3 </s>"
    learned = [t for t in feature["labels"] if t != -100]
    assert tok.decode(learned) == "b1 </s> b2 b3 </s>"
    # predicting on a finished chat writes its last assistant turn anew
    assert tok.decode(task._context({"messages": chat}, "row 1")) == "user: a1 assistant: b1 </s> user: a2 assistant:"


def test_causal_lm_chat_template_labels_assistant_turns(tmp_path: Path) -> None:
    word_tokenizer(tmp_path, "decoder")
    task = task_for("causal-lm", tmp_path)
    task.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} </s> {% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}")
    chat = [{"role": "user", "content": "a1"}, {"role": "assistant", "content": "b1"},
            {"role": "user", "content": "a2"}, {"role": "assistant", "content": "b2"}]
    feature = task.encode(rows_from([{"messages": chat}]))[0]
    tok = task.tokenizer
    learned = [t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != -100]
    assert tok.decode(learned) == "b1 </s> b2 </s>"  # the turns and the template's end-of-turn marker
    assert task._context({"messages": chat[:1]}, "row 1") == tok.convert_tokens_to_ids(["user:", "a1", "</s>",
                                                                                          "assistant:"])


def test_seq2seq_pads_labels_with_ignore(tmp_path: Path) -> None:
    word_tokenizer(tmp_path, "t5")
    task = task_for("seq2seq", tmp_path)
    rows = rows_from([{"source": "a1", "target": "b1 b2"}, {"source": "a2", "target": "b2"}])
    batch = task.collate(task.encode(rows))
    b1, b2 = task.tokenizer.convert_tokens_to_ids(["b1", "b2"])
    assert batch["labels"].tolist() == [[b1, b2, 1], [b2, 1, -100]]


def test_token_cls_labels_the_first_sub_token_of_each_word(tmp_path: Path) -> None:
    minilm_tokenizer(tmp_path)
    task = task_for("token-cls", tmp_path)
    rows = rows_from([{"tokens": ["zorblax", "visited", "ulaanbaatar"], "tags": ["B-PER", "O", "B-LOC"]}])
    task.fit(rows)
    feature = task.encode(rows)[0]
    pieces = task.tokenizer.convert_ids_to_tokens(feature["input_ids"])
    labelled = [(piece, task.labels.names[label]) for piece, label in zip(pieces, feature["labels"], strict=True)
                if label != -100]
    assert [tag for _, tag in labelled] == ["B-PER", "O", "B-LOC"]
    assert len(pieces) > 5 and not any(p.startswith("##") for p, _ in labelled)  # words did split; pieces unlabelled


def test_qa_maps_answers_to_tokens_and_truncated_answers_to_cls(tmp_path: Path) -> None:
    minilm_tokenizer(tmp_path)
    task = TASKS["qa"](load_tokenizer(str(tmp_path)), 24)
    context = "today, the boat was dark red; and then " + "the friend went to lima " * 5 + "with the blue kite."
    rows = rows_from([{"question": "What color is the boat?", "context": context, "answers": {"text": ["dark red"],
                       "answer_start": [context.index("dark red")]}},
                      {"question": "What color is the kite?", "context": context, "answers": [{"text": "blue"}]}])
    first, second = task.encode(rows)
    span = first["input_ids"][first["start_positions"]:first["end_positions"] + 1]
    assert task.tokenizer.decode(span) == "dark red"
    assert (second["start_positions"], second["end_positions"]) == (0, 0)  # "blue" was truncated away
    segments = task.collate([first, second])["token_type_ids"][0].tolist()
    assert segments[first["start_positions"]] == 1 and segments[1] == 0  # context segment 1, question 0


# -- bad data ----------------------------------------------------------------------------------


def test_missing_column_names_the_columns_found(tmp_path: Path) -> None:
    minilm_tokenizer(tmp_path)
    task = task_for("token-cls", tmp_path)
    with pytest.raises(DataError, match=r"row 2 has no column 'tags'; columns found: \['labels', 'tokens'\]"):
        task.check(rows_from([{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a"], "labels": ["O"]}], "ner.jsonl"))


def test_causal_lm_row_needs_prompt_and_completion_or_messages(tmp_path: Path) -> None:
    word_tokenizer(tmp_path, "decoder")
    task = task_for("causal-lm", tmp_path)
    with pytest.raises(DataError, match=r"row 1 has neither 'prompt' \+ 'completion' nor 'messages'.*\['prompt'\]"):
        task.check(rows_from([{"prompt": "a1"}], "chat.jsonl"))
    with pytest.raises(DataError, match="list of"):
        task.encode(rows_from([{"messages": [{"role": "user"}]}]))
    with pytest.raises(DataError, match="nothing to learn"):
        task.encode(rows_from([{"messages": [{"role": "user", "content": "a1"}]}]))


def test_unseen_tag_and_tag_count_are_errors(tmp_path: Path) -> None:
    minilm_tokenizer(tmp_path)
    task = task_for("token-cls", tmp_path)
    task.fit(rows_from([{"tokens": ["bob", "ran"], "tags": ["B-PER", "O"]}], "train.jsonl"))
    with pytest.raises(DataError, match=r"eval.jsonl, row 1: label 'B-LOC' was not seen.*\['B-PER', 'O'\]"):
        task.encode(rows_from([{"tokens": ["lima"], "tags": ["B-LOC"]}], "eval.jsonl"))
    with pytest.raises(DataError, match="row 1: 2 tokens but 1 tags"):
        task.encode(rows_from([{"tokens": "bob ran", "tags": ["O"]}], "eval.jsonl"))


def test_qa_answer_start_must_point_at_the_answer(tmp_path: Path) -> None:
    minilm_tokenizer(tmp_path)
    task = task_for("qa", tmp_path)
    row = {"question": "q?", "context": "the sky is blue", "answers": {"text": ["blue"], "answer_start": [3]}}
    with pytest.raises(DataError, match=r"qa.jsonl, row 1: the context at answer_start 3 reads ' sky'"):
        task.encode(rows_from([row], "qa.jsonl"))
    plain = task.encode(rows_from([{**row, "answers": "blue", "answer_start": 11}]))[0]
    assert plain["answers"] == ["blue"]
    with pytest.raises(DataError, match="does not occur in the context"):
        task.encode(rows_from([{**row, "answers": "green"}]))


def test_scored_pairs_need_a_score_on_every_row(tmp_path: Path) -> None:
    word_tokenizer(tmp_path, "encoder")
    task = task_for("feature-extraction", tmp_path)
    task.fit(rows_from(scored_pair_rows(4, seed=0)))
    with pytest.raises(DataError, match=r"eval.jsonl, row 2: no 'score' value"):
        task.encode(rows_from([scored_pair_rows(1, 1)[0], pair_rows(1, 1)[0]], "eval.jsonl"))


# -- the command line, end to end --------------------------------------------------------------


def _cli_setup(name: str, folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Save a tiny model for ``name`` into ``folder``; return (training rows, evaluation rows)."""
    if name in ("causal-lm", "seq2seq"):
        tokenizer = word_tokenizer(folder, "decoder" if name == "causal-lm" else "t5")
        if name == "causal-lm":
            llama_folder(folder, len(tokenizer), tokenizer.eos_token_id)
            return [{"prompt": a, "completion": b} for a, b in translation_rows(12, 1)], \
                [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
                 for a, b in translation_rows(4, 2)]
        t5_folder(folder, len(tokenizer))
        return [{"source": a, "target": b} for a, b in translation_rows(12, 1)], \
            [{"source": a, "target": b} for a, b in translation_rows(4, 2)]
    if name == "feature-extraction":
        bert_folder(folder, len(word_tokenizer(folder, "encoder")))
        return scored_pair_rows(12, 1), scored_pair_rows(4, 2)
    bert_folder(folder, len(minilm_tokenizer(folder)))
    return (ner_rows(12, 1), ner_rows(4, 2)) if name == "token-cls" else (qa_rows(12, 1), qa_rows(4, 2))


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", ["causal-lm", "seq2seq", "token-cls", "qa", "feature-extraction"])
def test_cli_trains_evaluates_and_predicts(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli import main

    model = tmp_path / "model"
    train_rows, eval_rows = _cli_setup(name, model)
    out = tmp_path / "run"
    eval_file = _write(tmp_path / "eval.jsonl", eval_rows)
    assert main(["train", "--task", name, "--model", str(model), "--train-file", _write(tmp_path / "train.jsonl",
                 train_rows), "--eval-file", eval_file, "--max-steps", "2", "--batch-size", "4", "--output-dir",
                 str(out), "--threads", "1", "--no-progress"]) == 0
    assert "after training:" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 0
    task = TASKS[name](load_tokenizer(str(model)), state=json.loads((out / "run.json").read_text())["task_state"])
    assert task.metric in json.loads(capsys.readouterr().out)
    assert main(["predict", str(out), "--file", eval_file]) == 0
    predictions = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    assert len(predictions) == len(eval_rows)


def test_qa_best_span_respects_order_length_and_context() -> None:
    from deltatune.train.tasks.qa_spans import best_span

    offsets = [None, None, (0, 3), (4, 7), (8, 11), None]  # [CLS] question context context context [SEP]
    start = torch.tensor([9.0, 9.0, 0.0, 1.0, 3.0, 9.0])
    end = torch.tensor([9.0, 9.0, 5.0, 0.0, 0.0, 9.0])
    # start 4 + end 2 = 8 would be highest, but that end lies before its start; [CLS]/question never count
    assert best_span(start, end, offsets, max_tokens=30) == (2, 2, 5.0)
    start, end = torch.tensor([0.0, 0, 5, 0, 0, 0]), torch.tensor([0.0, 0, 0, 1, 5, 0])
    assert best_span(start, end, offsets, max_tokens=3)[:2] == (2, 4)  # 5 + 5
    assert best_span(start, end, offsets, max_tokens=2)[:2] == (2, 3)  # 5 + 1: three tokens are too long
    assert best_span(start, end, [None] * 6, max_tokens=30)[:2] == (0, 0)  # no context left


def test_qa_unanswerable_questions_point_at_cls(tmp_path: Path) -> None:
    minilm_tokenizer(tmp_path)
    task = task_for("qa", tmp_path)
    rows = rows_from([{"question": "Who?", "context": "the sky is blue", "answers": {"text": [], "answer_start": []}},
                      {"question": "What?", "context": "the sky is blue", "answers": {"text": ["blue", "sky is blue"],
                                                                                       "answer_start": [11, 4]}}])
    task.fit(rows)
    assert task.state() == {"unanswerable": True}
    empty, two = task.encode(rows)
    assert (empty["start_positions"], empty["end_positions"], empty["answers"]) == (0, 0, [""])
    assert two["answers"] == ["blue", "sky is blue"]


def _causal_lm_run(folder: Path, out: Path, **options: Any) -> tuple[torch.nn.Module, list[float]]:
    """Six LoRA steps of the causal-lm task on a tiny LLaMA; (model, loss of every step)."""
    seed_everything(0)
    task = task_for("causal-lm", folder)
    rows = rows_from([{"prompt": a + " =>", "completion": b} for a, b in translation_rows(48, seed=1)], "train")
    task.fit(rows)
    model = task.load_model(str(folder))
    dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    losses: list[float] = []
    config = TrainConfig(output_dir=str(out), max_steps=6, batch_size=8, lr=1e-2, progress=False, log_every=1,
                         **options)
    original = task.loss

    def recorded_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = original(model, batch)
        losses.append(float(loss.detach()))
        return loss

    task.loss = recorded_loss  # type: ignore[method-assign]
    Trainer(model, task, task.encode(rows), config=config).fit()
    return model, losses


def test_trainer_accelerate_option_trains_the_same_run_through_fused_kernels(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(tmp_path, "decoder")
    llama_folder(tmp_path, len(tokenizer), tokenizer.eos_token_id)
    _, stock = _causal_lm_run(tmp_path, tmp_path / "stock")
    model, fused = _causal_lm_run(tmp_path, tmp_path / "fused", accelerate=True, retain_freed_memory=True)
    assert "forward" in model.__dict__  # the instance runs the fused loss
    assert len(stock) == len(fused) == 6
    assert fused == pytest.approx(stock, rel=1e-4)
    assert fused[-1] < fused[0]


def test_trainer_accelerate_option_refuses_an_unsupported_model(tmp_path: Path) -> None:
    bert_folder(tmp_path, len(minilm_tokenizer(tmp_path)))
    task = task_for("token-cls", tmp_path)
    task.fit(rows_from(ner_rows(8, 1)))
    model = task.load_model(str(tmp_path))
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear", task_type="TOKEN_CLS"))
    with pytest.raises(dt.TargetError, match="dt.accelerate supports"):
        Trainer(model, task, task.encode(rows_from(ner_rows(8, 1))),
                config=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, progress=False,
                                   accelerate=True))
    assert not any("forward" in m.__dict__ for m in model.modules())
