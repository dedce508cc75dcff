"""Full fine-tuning (methods/full.py) against plain torch training of an unwrapped copy of the model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.cli import main
from deltatune.train import commands

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_classifier() -> nn.Module:
    """A random 2-layer BERT classifier without dropout (so the two trainings see the same function)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


IDS = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 1])


def train(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> Tensor:
    """``steps`` AdamW steps (no weight decay) on a fixed batch over the trainable parameters; the logits after."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return logits(model)


def logits(model: nn.Module) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def full_model() -> nn.Module:
    return dt.attach(tiny_classifier(), dt.FullConfig(task_type="SEQ_CLS"))


def test_full_fine_tuning_equals_training_the_weights_themselves() -> None:
    reference = tiny_classifier()
    for param in reference.parameters():
        param.requires_grad_(True)
    expected, got = train(reference), train(full_model())
    assert (expected - logits(tiny_classifier())).abs().max() > 0.1  # training moved the logits
    # same trajectory; only the rounding of W x + ΔW x against (W + ΔW) x differs
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_every_parameter_of_the_model_trains_once() -> None:
    model = full_model()
    trainable, _ = dt.trainable_parameters(model)
    assert trainable == sum(p.numel() for p in tiny_classifier().parameters())
    assert dt.adapter_parameters(model, "default") == trainable


def test_weight_decay_pulls_towards_the_pretrained_weights() -> None:
    """AdamW's decay shrinks ΔW, not W: with a zero gradient the weights stay at W0."""
    model = full_model()
    changes = [p for n, p in model.named_parameters() if n.endswith("weight_change")]
    optimizer = torch.optim.AdamW(changes, lr=0.1, weight_decay=0.5)
    before = logits(model)
    for param in changes:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    assert torch.equal(logits(model), before)


def test_save_load_disable_and_merge(tmp_path: Path) -> None:
    model = full_model()
    trained = train(model, steps=3)
    dt.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FULL"
    loaded = dt.load(tiny_classifier(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), trained, rtol=0, atol=0)
    with dt.disabled(loaded):
        assert torch.equal(logits(loaded), logits(tiny_classifier()))
    merged = dt.unload(loaded, merge=True)
    torch.testing.assert_close(logits(merged), trained, rtol=1e-4, atol=1e-5)


def test_delta_weight_is_what_training_changed() -> None:
    """The ΔW analysis sees the trained change of every linear layer (W_trained - W0 of the reference)."""
    reference, model = tiny_classifier(), full_model()
    for param in reference.parameters():
        param.requires_grad_(True)
    train(reference, steps=2)
    train(model, steps=2)
    start = dict(tiny_classifier().named_parameters())
    ends = dict(reference.named_parameters())
    for name, module in model.named_modules():
        if name.endswith("attention.self.query"):
            change = module.deltas["default"].delta_weight(module.base_layer.weight)
            torch.testing.assert_close(change, ends[f"{name}.weight"] - start[f"{name}.weight"], rtol=1e-3, atol=1e-6)


def test_cli_trains_with_method_full(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert_dir), "--train-file", str(sentiment_file), "--method", "full",
                 "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3", "--threads", "1", "--no-progress",
                 "--max-eval-rows", "16", "--output-dir", str(out)]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "FULL"
    metrics = commands.evaluate_run(out, "", "", "adapter", 16)
    assert 0.0 <= metrics["accuracy"] <= 1.0
