"""Full fine-tuning (methods/full.py) against plain torch training of an unwrapped copy of the model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from conftest import state_hash
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


def train(model: nn.Module, steps: int = 5, lr: float = 1e-2, ids: Tensor = IDS, labels: Tensor = LABELS) -> Tensor:
    """``steps`` AdamW steps (no weight decay) on a fixed batch over the trainable parameters; the logits after."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return logits(model, ids)


def logits(model: nn.Module, ids: Tensor = IDS) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


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


def tied_llama() -> nn.Module:
    """A random 2-layer LLaMA whose output head is its embedding table (tie_word_embeddings, as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


LM_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))


def lm_train(model: nn.Module, steps: int = 5) -> Tensor:
    """``train`` on next-token loss (the batch is its own labels); the logits after."""
    return train(model, steps, ids=LM_IDS, labels=LM_IDS)


def lm_logits(model: nn.Module) -> Tensor:
    return logits(model, LM_IDS)


def tied_copies(model: nn.Module) -> bool:
    return model.lm_head.copies["default"].weight is model.model.embed_tokens.copies["default"].weight


def test_a_tied_head_trains_once_with_its_embedding() -> None:
    model = dt.attach(tied_llama(), dt.FullConfig())
    assert tied_copies(model)
    trainable, total = dt.trainable_parameters(model)
    assert trainable == sum(p.numel() for p in tied_llama().parameters())  # unique base parameters: 100%
    assert dt.adapter_parameters(model, "default") == trainable


def test_tied_full_fine_tuning_equals_training_the_tied_model() -> None:
    """The embedding gets the gradient of both its uses, summed, once per step, as in the tied base."""
    base = tied_llama()
    reference = copy.deepcopy(base)  # the deep copy keeps the tie
    for param in reference.parameters():
        param.requires_grad_(True)
    model = dt.attach(base, dt.FullConfig())
    expected, got = lm_train(reference), lm_train(model)
    assert (expected - lm_logits(tied_llama())).abs().max() > 0.1  # training moved the logits
    # same trajectory; only the rounding of W x + ΔW x against (W + ΔW) x differs (fp32, n <= 64 terms: conftest)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    merged = dt.unload(model, merge=True)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still a tied model
    torch.testing.assert_close(lm_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_tied_copies_save_and_load_tied(tmp_path: Path) -> None:
    model = dt.attach(tied_llama(), dt.FullConfig())
    trained = lm_train(model, steps=3)
    dt.save(model, tmp_path / "adapter")
    loaded = dt.load(tied_llama(), tmp_path / "adapter", trainable=True)
    assert tied_copies(loaded)
    assert dt.trainable_parameters(loaded)[0] == sum(p.numel() for p in tied_llama().parameters())
    torch.testing.assert_close(lm_logits(loaded), trained, rtol=0, atol=0)
    unmerged = dt.unload(loaded, merge=False)
    assert unmerged.lm_head.weight is unmerged.model.embed_tokens.weight
    assert torch.equal(lm_logits(unmerged), lm_logits(tied_llama()))


def test_a_folder_trained_untied_loads_untied(tmp_path: Path) -> None:
    """A folder whose tied copies hold different values (saved before ties were kept) computes what it
    was trained to: the copies load untied. Swapping it into a tied adapter is refused."""
    from safetensors.torch import load_file, save_file


    model = dt.attach(tied_llama(), dt.FullConfig())
    lm_train(model, steps=2)
    dt.save(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    head = "base_model.model.lm_head.weight"
    tensors[head] = tensors[head] + 0.5 * torch.randn(tensors[head].shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, weights)
    loaded = dt.load(tied_llama(), tmp_path / "adapter")
    assert not tied_copies(loaded)
    assert torch.equal(loaded.lm_head.copies["default"].weight, tensors[head])
    assert torch.equal(loaded.model.embed_tokens.copies["default"].weight,
                       tensors["base_model.model.model.embed_tokens.weight"])
    before = state_hash(model)
    with pytest.raises(dt.AdapterFileError, match="untied"):
        dt.hotswap(model, tmp_path / "adapter")
    assert state_hash(model) == before


def test_other_methods_keep_peft_untied_copies() -> None:
    """peft's modules_to_save (ensure_weight_tying=False, its default) trains a tied head apart from the
    embedding; LoRA keeps that, so trainable counts match peft's."""
    import peft

    names = ["embed_tokens", "lm_head"]
    ours = dt.attach(tied_llama(), dt.LoraConfig(target_modules=["q_proj"], modules_to_save=names))
    theirs = peft.get_peft_model(tied_llama(), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=names))
    assert dt.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    assert not tied_copies(ours)
