"""BitFit on whole models: which biases it selects, its file, switching it off and on, several
adapters, and the errors. peft has no BitFit, so there is no parity test; the invariant battery on
every base kind with a bias (and LayerNorm) is in test_invariants.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import close, state_hash, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from deltatune.errors import AdapterFileError, TargetError
from deltatune.state import state_of


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def biases(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(".bias")}


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(x).logits.square().mean().backward()
    optimizer.step()
    model.eval()


def test_all_biases_train_and_nothing_else() -> None:
    base, x = tiny_bert(), token_ids()
    model = dt.attach(copy.deepcopy(base), dt.BitFitConfig(task_type="SEQ_CLS"))
    wanted = {n for n in biases(base) if not n.startswith("classifier.")}
    selected = state_of(model).model_deltas["default"].paths
    assert {f"{p}.bias" for p in selected} == wanted  # LayerNorm biases included, the head trained in full
    head = sum(p.numel() for p in base.classifier.parameters())
    copies = sum(biases(base)[n].numel() for n in wanted)  # the trained copies join the model's parameters
    assert dt.trainable_parameters(model) == (copies + head, sum(p.numel() for p in base.parameters()) + head + copies)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("bias")}
    originals = {n: p.detach().clone() for n, p in biases(base).items()}
    train_step(model, x)
    assert not torch.equal(logits(model, x), logits(base, x))
    for name, value in weights_before.items():
        if "classifier" not in name:
            assert torch.equal(model.get_parameter(name), value), name
    with dt.disabled(model):
        assert torch.equal(logits(model, x), logits(base, x))
        assert all(torch.equal(p, originals[n]) for n, p in biases(model).items() if n in originals)


def test_selected_modules_only() -> None:
    model = dt.attach(tiny_bert(), dt.BitFitConfig(target_modules=["query", "output.LayerNorm"],
                                                   layers_to_transform=[1], layers_pattern="layer"))
    assert state_of(model).model_deltas["default"].paths == [
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.output.LayerNorm",
        "bert.encoder.layer.1.output.LayerNorm"]


def test_save_load_file_layout(tmp_path: Path) -> None:
    base, x = tiny_gpt2(), token_ids()
    model = dt.attach(copy.deepcopy(base), dt.BitFitConfig(target_modules=["c_attn", "ln_f"]))
    train_step(model, x)
    dt.save(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.model.transformer.h.0.attn.c_attn.bias",
                               "base_model.model.transformer.h.1.attn.c_attn.bias", "base_model.model.transformer.ln_f.bias"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["target_modules"] == ["c_attn", "ln_f"]
    loaded = dt.load(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = dt.load(copy.deepcopy(base), tmp_path, trainable=True)
    assert dt.trainable_parameters(trainable)[0] == sum(t.numel() for t in tensors.values())


def test_unload_and_delete_restore_the_original_parameters() -> None:
    base, x = tiny_gpt2(), token_ids()
    model = copy.deepcopy(base)
    originals = dict(biases(model))
    dt.attach(model, dt.BitFitConfig())
    assert all(model.get_parameter(n) is p for n, p in originals.items()), "the base biases stay in place"
    train_step(model, x)
    adapted = logits(model, x)
    dt.delete_adapter(model, "default")
    assert torch.equal(logits(model, x), logits(base, x))
    assert all(model.get_parameter(n) is p for n, p in originals.items()), "the original Parameter objects come back"

    model = dt.attach(copy.deepcopy(base), dt.BitFitConfig())
    train_step(model, x)
    merged_out = logits(model, x)
    dt.unload(model, merge=True)
    # fp32: the merged model adds the change inside the module, the adapter after it (one rounding apart)
    assert close(logits(model, x), merged_out) and not hasattr(model, "deltatune_state")
    assert not torch.equal(adapted, logits(base, x))


def test_two_adapters_switch() -> None:
    base, x = tiny_gpt2(), token_ids()
    model = dt.attach(copy.deepcopy(base), dt.BitFitConfig(target_modules=["c_attn", "c_fc"]))
    dt.attach(model, dt.BitFitConfig(target_modules=["c_attn"]), name="other")
    for name, part in state_of(model).model_deltas.items():
        with torch.no_grad():
            for i, bias in enumerate(part.biases):
                bias.add_(0.1 * (i + 1) * (2 if name == "other" else 1))
    first = logits(model, x)
    dt.set_active(model, "other")
    second = logits(model, x)
    with dt.disabled(model):
        assert torch.equal(logits(model, x), logits(base, x))
    dt.set_active(model, "default")
    assert torch.equal(logits(model, x), first) and not torch.equal(first, second)
    dt.delete_adapter(model, "default")
    dt.set_active(model, "other")
    assert torch.equal(logits(model, x), second)


def test_with_lora_on_the_same_layers(tmp_path: Path) -> None:
    base, x = tiny_gpt2(), token_ids()
    model = dt.attach(copy.deepcopy(base), dt.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    dt.attach(model, dt.BitFitConfig(target_modules=["c_attn"]), name="bias")
    dt.set_active(model, ["default", "bias"])
    train_step(model, x)
    both = logits(model, x)
    dt.save(model, tmp_path)
    loaded = dt.load(copy.deepcopy(base), tmp_path)
    dt.load(loaded, tmp_path / "bias", name="bias")
    dt.set_active(loaded, ["default", "bias"])
    assert torch.equal(logits(loaded, x), both)
    with dt.disabled(loaded):
        assert torch.equal(logits(loaded, x), logits(base, x))


def test_errors_leave_the_model_unchanged(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="no module with a bias"):
        dt.attach(tiny_llama(), dt.BitFitConfig())  # LLaMA's layers have no biases
    dt.save(dt.attach(tiny_gpt2(), dt.BitFitConfig(target_modules=["c_attn"])), tmp_path)
    other = tiny_gpt2()
    other.transformer.h[1].attn.c_attn.bias = nn.Parameter(torch.zeros(7))
    before = state_hash(other)
    with pytest.raises(AdapterFileError, match="shape"):
        dt.load(other, tmp_path)
    assert state_hash(other) == before and not hasattr(other, "deltatune_state")
