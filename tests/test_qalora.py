"""QA-LoRA and the INT4 group format: the format against a dense numpy-style reference, QA-LoRA's
forward against peft's QALoraLinearVariant, and the lossless 4-bit merge against the unmerged
adapted model (the dense oracle), with plain LoRA's lossy re-quantized merge as the contrast."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import state_hash, tiny_llama, token_ids
from deltatune.quant import Int4GroupLinear, load_quantized, save_quantized
from deltatune.quant.int4_group import dequantize_int4_group, quantize_int4_group, unpack_codes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUP = 16


def test_int4_group_round_trip_is_within_half_a_step_and_packs_two_codes_per_byte() -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    weight[0, :16] = 0.25  # a constant group is stored exactly
    packed, scale, offset = quantize_int4_group(weight, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32) and scale.shape == offset.shape == (8, 4)
    codes = unpack_codes(packed)
    assert torch.equal(codes[:, 0::2], packed & 15) and torch.equal(codes[:, 1::2], packed >> 4)
    groups = weight.view(8, 4, 16)
    reference = groups.amin(2, keepdim=True) + codes.view(8, 4, 16).float() * scale.unsqueeze(2)
    dense = dequantize_int4_group(packed, scale, offset)
    torch.testing.assert_close(dense, reference.view(8, 64), rtol=0, atol=1e-6)
    assert ((dense - weight).abs().view(8, 4, 16) <= scale.unsqueeze(2) / 2 + 1e-6).all()
    assert torch.equal(dense[0, :16], weight[0, :16])


def test_quantize_chooses_the_format_and_refuses_a_group_size_that_does_not_divide() -> None:
    model = dt.quantize(tiny_llama(), dt.QuantConfig(quant_type="int4_group", group_size=GROUP))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4GroupLinear) and layer.group_size == GROUP and layer.scale.shape == (32, 64 // GROUP)
    expected = layer.dequantize()
    dt.quant.dequantize(model)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected)
    base = tiny_llama()
    before = state_hash(base)
    with pytest.raises(dt.QuantError, match="do not split into groups of 24"):
        dt.quantize(base, dt.QuantConfig(quant_type="int4_group", group_size=24))
    assert state_hash(base) == before
    with pytest.raises(dt.ConfigError, match="group_size"):
        dt.QuantConfig(quant_type="int4_group", group_size=3)


def test_forward_matches_peft_qalora_variant_on_a_plain_linear() -> None:
    import peft
    from peft.tuners.lora.variants import QALoraLinearVariant

    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 24))
    reference = copy.deepcopy(model)
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False,
                                   use_qalora=True, qalora_group_size=GROUP))
    delta = model.proj.deltas["default"]
    assert delta.A.shape == (4, 64 // GROUP) and delta.B.shape == (24, 4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_qalora=True, qalora_group_size=GROUP)
    peft_model = peft.get_peft_model(reference, config)
    layer = peft_model.base_model.model.proj
    QALoraLinearVariant.init(layer, "default", config)  # peft applies the variant to GPTQ layers only
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(delta.A)
        layer.lora_B["default"].weight.copy_(delta.B)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = QALoraLinearVariant.forward(layer, "default", x, layer.base_layer(x))
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
        merged_weight = layer.base_layer.weight + delta.low_rank_weight()  # the change as a dense weight
        torch.testing.assert_close(nn.functional.linear(x, merged_weight, layer.base_layer.bias), expected,
                                   rtol=1e-5, atol=1e-6)


def adapted(qalora_group: int | None, seed: int = 0) -> nn.Module:
    """A tiny LLaMA on an int4_group base with random (non-identity) QA-LoRA or, for None, plain LoRA adapters."""
    model = dt.quantize(tiny_llama(seed), dt.QuantConfig(quant_type="int4_group", group_size=GROUP))
    extra = {} if qalora_group is None else {"use_qalora": True, "qalora_group_size": qalora_group}
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **extra))
    return model


def codes(model: nn.Module) -> dict[str, bytes]:
    """Each 4-bit layer's packed codes by layer name (a wrapped layer's ``base_layer`` under the wrapper's name)."""
    return {name.removesuffix(".base_layer"): m.weight.numpy().tobytes()
            for name, m in model.named_modules() if isinstance(m, Int4GroupLinear)}


@torch.no_grad()
def merged_error(model: nn.Module) -> tuple[float, list[str]]:
    """Relative max error of the merged 4-bit model's logits against the adapted model's, and the warnings."""
    ids = token_ids()
    expected = model(ids).logits
    with dt.disabled(model):
        assert (model(ids).logits - expected).abs().max() > 1e-2  # the adapters change the outputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.unload(model, merge=True, requantize=True)
    got = model(ids).logits
    return ((got - expected).abs().max() / expected.abs().max()).item(), [str(w.message) for w in caught]


@pytest.mark.parametrize("qalora_group", [GROUP, 2 * GROUP], ids=["same-group", "twice-the-group"])
def test_qalora_merges_into_the_offsets_losslessly_and_keeps_the_codes(qalora_group: int) -> None:
    model = adapted(qalora_group)
    before = codes(model)
    error, caught = merged_error(model)
    assert error < 1e-5
    assert not [m for m in caught if "re-quantizing" in m]
    assert codes(model) == before and len(before) == 2 * len(TARGETS)
    assert all(isinstance(m, Int4GroupLinear) for m in (model.model.layers[0].self_attn.q_proj,
                                                        model.model.layers[1].mlp.down_proj))


def test_plain_lora_and_a_smaller_qalora_group_fall_back_to_lossy_requantizing() -> None:
    qa_error, _ = merged_error(adapted(GROUP))
    for model in (adapted(None), adapted(GROUP // 2)):
        error, caught = merged_error(model)
        warned = [m for m in caught if "re-quantizing" in m]
        assert len(warned) == 2 * len(TARGETS) and "use_qalora=True, qalora_group_size=16" in warned[0]
        assert error > 1e-3 and error > 100 * qa_error


def test_qalora_saves_in_peft_layout_and_loads_back(tmp_path: Path) -> None:
    model = adapted(GROUP)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    dt.save(model, tmp_path)
    fresh = dt.quantize(tiny_llama(), dt.QuantConfig(quant_type="int4_group", group_size=GROUP))
    dt.load(fresh, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == GROUP
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)


def test_qalora_refuses_bad_settings_and_a_layer_that_does_not_group() -> None:
    with pytest.raises(dt.ConfigError, match="use_dora"):
        dt.LoraConfig(use_qalora=True, use_dora=True)
    with pytest.raises(dt.ConfigError, match="init_lora_weights"):
        dt.LoraConfig(use_qalora=True, init_lora_weights="pissa")
    model = tiny_llama()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="qalora_group_size=24"):
        dt.attach(model, dt.LoraConfig(target_modules=["q_proj"], use_qalora=True, qalora_group_size=24))
    assert state_hash(model) == before


def test_the_lossless_merge_saves_as_int4_group_and_loads_back_bit_for_bit(tmp_path: Path) -> None:
    model = adapted(GROUP)
    dt.unload(model, merge=True, requantize=True)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tmp_path / "merged.safetensors")
    fresh = load_quantized(tiny_llama(seed=5), tmp_path / "merged.safetensors")  # other weights: all replaced
    assert codes(fresh) == codes(model) and len(codes(fresh)) == 2 * len(TARGETS)
    for name, layer in model.named_modules():
        if isinstance(layer, Int4GroupLinear):
            again = fresh.get_submodule(name)
            assert isinstance(again, Int4GroupLinear) and again.group_size == GROUP
            assert torch.equal(again.scale, layer.scale) and torch.equal(again.offset, layer.offset)
            assert again.compute_dtype == layer.compute_dtype
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_an_int4_group_checkpoint_for_another_shape_is_refused_unchanged(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = dt.quantize(tiny_llama(), dt.QuantConfig(quant_type="int4_group", group_size=GROUP))
    save_quantized(model, tmp_path / "q.safetensors")
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=128))
    before = state_hash(wide)
    with pytest.raises(dt.QuantError, match="belongs to another model configuration"):
        load_quantized(wide, tmp_path / "q.safetensors")
    assert state_hash(wide) == before and not any(isinstance(m, Int4GroupLinear) for m in wide.modules())
    damaged = dict(model.state_dict())
    damaged["model.layers.0.self_attn.q_proj.scale"] = damaged["model.layers.0.self_attn.q_proj.scale"][:, :1]
    fresh = tiny_llama()
    before = state_hash(fresh)
    with pytest.raises(dt.QuantError, match="do not fit together"):
        load_quantized(fresh, damaged)
    assert state_hash(fresh) == before
