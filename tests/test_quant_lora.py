"""LoRA on a 4-bit base (QLoRA): the battery's invariants, merging, peft-format adapters that load
on the unquantized base, and a short fine-tune that lowers the loss."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import close, lm_losses, state_hash, tiny_llama, token_ids
from deltatune.layer import DeltaLayer
from deltatune.quant import Linear4bit

TARGETS = ["q_proj", "v_proj", "down_proj"]



def qlora(seed: int = 0, dtype: torch.dtype = torch.float32, init: bool | str = False) -> nn.Module:
    model = dt.quantize(tiny_llama(seed).to(dtype), dt.QuantConfig(compute_dtype=dtype))
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    return model


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(token_ids()).logits


def test_wraps_the_4bit_layers_and_counts_parameters() -> None:
    model = qlora()
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DeltaLayer) and isinstance(layer.base_layer, Linear4bit)
    delta = layer.deltas["default"]
    assert delta.A.dtype == delta.B.dtype == torch.float32
    per_layer = 4 * (32 + 32) + 4 * (32 + 16) + 4 * (64 + 32)  # q (32->32), v (32->16, 2 kv heads), down (64->32)
    assert dt.trainable_parameters(model)[0] == 2 * per_layer


def test_zero_init_and_disabled_give_the_4bit_base_output() -> None:
    base = dt.quantize(tiny_llama())
    expected = logits(base)
    model = qlora(init=True)
    assert torch.equal(logits(model), expected)
    dt.delete_adapter(model, "default")
    dt.attach(model, dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    assert not torch.equal(logits(model), expected)
    with dt.disabled(model):
        assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_unload_merge_gives_a_dense_model_with_the_same_outputs(dtype: torch.dtype) -> None:
    model = qlora(dtype=dtype)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        adapted_layer = model.model.layers[0].self_attn.q_proj(x)
    adapted = logits(model)
    dt.unload(model, merge=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, (Linear4bit, DeltaLayer))]
    assert not quantized, quantized  # adapted layers merged, the others dequantized: a dense model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == dtype
    with torch.no_grad():
        assert close(q_proj(x), adapted_layer, dtype), (q_proj(x) - adapted_layer).abs().max()
    if dtype == torch.float32:
        assert close(logits(model), adapted), (logits(model) - adapted).abs().max()
    else:  # training kept norms and embeddings in fp32; one cast makes the merged model uniformly bf16
        assert logits(model.to(dtype)).isfinite().all()


def test_merged_weight_is_dequantized_base_plus_delta() -> None:
    model = qlora()
    layer = model.model.layers[0].self_attn.q_proj
    delta = layer.deltas["default"]
    expected = layer.base_layer.dequantize() + delta.scaling * (delta.B @ delta.A).detach()
    dt.unload(model, merge=True)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=1e-6)


def test_requantize_is_explicit_and_warns_with_the_error() -> None:
    model = qlora()
    adapted = logits(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.unload(model, merge=True, requantize=True)
    messages = [str(w.message) for w in caught if "re-quantizing" in str(w.message)]
    assert len(messages) == 2 * len(TARGETS) and all("relative Frobenius error" in m for m in messages)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(model.model.layers[0].self_attn.k_proj, Linear4bit)  # untouched layers stay 4-bit
    assert not close(logits(model), adapted)  # lossy, which is why it is not the default


def test_in_place_merge_and_base_rewriting_inits_are_refused_without_changes() -> None:
    model = qlora()
    before = state_hash(model)
    with pytest.raises(dt.QuantError, match="dt.unload\\(model, merge=True\\)"):
        dt.merge(model)
    assert state_hash(model) == before and model.model.layers[0].self_attn.q_proj.merged == []
    with pytest.raises(dt.QuantError, match="4 bits"):
        dt.attach(model, dt.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights="pissa"), name="p")
    assert state_hash(model) == before and dt.adapter_names(model) == ["default"]


def test_unload_without_merge_returns_the_4bit_model() -> None:
    base = dt.quantize(tiny_llama())
    expected, before = logits(base), state_hash(base)
    model = qlora()
    dt.unload(model, merge=False)
    assert state_hash(model) == before and torch.equal(logits(model), expected)


def test_save_load_on_a_fresh_4bit_base(tmp_path: Path) -> None:
    model = qlora()
    dt.save(model, tmp_path)
    fresh = dt.load(dt.quantize(tiny_llama()), tmp_path)
    assert torch.equal(logits(fresh), logits(model))


def test_adapter_is_a_peft_lora_file_for_the_unquantized_base(tmp_path: Path) -> None:
    """The adapter trained on the 4-bit base is an ordinary LoRA adapter: peft loads it onto the
    full-precision model and computes what deltatune computes there."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model = qlora()
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(TARGETS)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    ours = dt.load(tiny_llama(), tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    expected = logits(theirs)
    assert close(logits(ours), expected), (logits(ours) - expected).abs().max()
    # and on the unquantized base the adapter still does what it did on the 4-bit one, up to 4-bit rounding
    assert ((logits(ours) - logits(model)).norm() / logits(model).norm()) < 0.2


def test_gradient_checkpointing_with_frozen_4bit_base() -> None:
    model = qlora()
    model.gradient_checkpointing_enable()
    model.train()
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_short_qlora_fine_tune_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = dt.quantize(tiny_llama(), dt.QuantConfig(quant_type="nf4"))
    dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ids = token_ids(batch=4, length=16)
    losses = lm_losses(model, ids, steps=10, lr=2e-2)
    assert losses[-1] < losses[0] - 0.25 and losses[-1] == min(losses), losses  # 4.85 -> about 4.5
    assert all(isinstance(m, Linear4bit) for n, m in model.named_modules() if n.endswith("base_layer"))

