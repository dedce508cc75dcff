"""``Linear4bit`` and ``dt.quantize``: forward equal to bitsandbytes, a backward that keeps only
the packed weight, the bitsandbytes checkpoint layout both ways, config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import state_hash, tiny_gpt2, tiny_llama, token_ids
from deltatune.quant import Linear4bit, QuantConfig, dequantize_4bit, load_quantized, quantize_4bit, save_quantized
from deltatune.quant.linear import Dequantized
from test_quant_format import FIXTURES, needs_fixtures

LINEAR_FIXTURE = FIXTURES / "linear4bit_state_dict.safetensors"


def fixture_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(LINEAR_FIXTURE))


@needs_fixtures
def test_layer_state_dict_and_output_equal_bitsandbytes() -> None:
    ref = fixture_tensors()
    layer = Linear4bit.from_weight(ref["_input_fp32.dense_weight"], ref["bias"], "nf4", 64, True, torch.float32)
    mine = layer.state_dict()
    assert set(mine) == {k for k in ref if not k.startswith("_")}
    for key, value in mine.items():
        assert value.dtype == ref[key].dtype and torch.equal(value, ref[key]), key
    assert torch.equal(layer(ref["_input_fp32.x"]), ref["_output_fp32.y"])


@needs_fixtures
def test_layer_loads_bitsandbytes_state_dict() -> None:
    """Loading adopts the stored state, whatever the layer was built with (here fp4, no double quant)."""
    ref = fixture_tensors()
    layer = Linear4bit.from_weight(torch.randn(256, 128), torch.zeros(256), "fp4", 128, False)
    layer.load_state_dict({k: v for k, v in ref.items() if not k.startswith("_")})
    assert layer.quant_type == "nf4" and layer.blocksize == 64 and layer.nested_absmax is not None
    assert torch.equal(layer(ref["_input_fp32.x"]), ref["_output_fp32.y"])
    assert all(torch.equal(v, ref[k]) for k, v in layer.state_dict().items())


def test_backward_saves_only_the_packed_weight() -> None:
    """The graph holds no dense (out x in) tensor; grad_input equals the dense oracle's exactly."""
    weight = torch.randn(96, 80)
    layer = Linear4bit.from_weight(weight, torch.randn(96), compute_dtype=torch.float32)
    dense = layer.dequantize()
    saved: list[torch.Tensor] = []
    x = torch.randn(4, 80, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert all(t.numel() < dense.numel() or t.dtype == torch.uint8 for t in saved), [t.shape for t in saved]
    assert any(t is layer.weight for t in saved)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, dense, layer.bias).backward(grad)
    assert x.grad is not None and torch.equal(x.grad, x_ref.grad)
    assert layer.weight.grad is None


def test_trained_bias_gets_its_gradient() -> None:
    layer = Linear4bit.from_weight(torch.randn(16, 8), torch.randn(16), compute_dtype=torch.float32)
    assert layer.bias is not None
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 8)
    layer(x).square().sum().backward()
    bias = layer.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x, layer.dequantize(), bias).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, bias.grad)


@pytest.mark.parametrize(("stored", "compute"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.bfloat16)])
def test_compute_dtype_goes_through_the_stored_dtype(stored: torch.dtype, compute: torch.dtype) -> None:
    """As bitsandbytes: dequantize to the original dtype, then cast to the compute dtype."""
    weight = torch.randn(24, 40).to(stored)
    layer = Linear4bit.from_weight(weight, compute_dtype=compute)
    packed, state = quantize_4bit(weight)
    assert torch.equal(layer.dequantize(), dequantize_4bit(packed, state).to(compute))
    x = torch.randn(2, 40, dtype=stored)
    out = layer(x)
    assert out.dtype == stored
    assert torch.equal(out, torch.nn.functional.linear(x.to(compute), layer.dequantize()).to(stored))


def test_half_cast_keeps_the_quantization_state() -> None:
    layer = Linear4bit.from_weight(torch.randn(32, 32), torch.randn(32))
    before = layer.dequantize(torch.float32)
    layer.half()
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax is not None
    assert layer.nested_absmax.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_gradcheck_of_the_autograd_function() -> None:
    layer = Linear4bit.from_weight(torch.randn(6, 5, dtype=torch.float32), compute_dtype=torch.float32)
    dense = layer.dequantize().double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    state = layer.quant_state()
    # in fp64 the dequantized weight is exact, so the function must be linear with Jacobian W
    out = Dequantized.apply(x, layer.weight, state, None)
    torch.testing.assert_close(out, x @ dense.t())
    assert torch.autograd.gradcheck(lambda t: Dequantized.apply(t, layer.weight, state, None), (x,))


# ----------------------------------------------------------------------------------------- quantize

def test_quantize_llama_replaces_linears_and_prepares_training() -> None:
    model = tiny_llama()
    ids = token_ids()
    reference = model(ids).logits
    dt.quantize(model, dt.QuantConfig())
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("proj",))}
    assert kinds == {"Linear4bit"} and type(model.lm_head) is nn.Linear  # the output head is skipped
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    logits = model(ids).logits
    rel = ((logits - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.2  # 4-bit rounding changes the output, but not beyond recognition
    assert model.get_input_embeddings()(ids).requires_grad  # enable_input_require_grads


def test_quantize_bf16_model_keeps_unquantized_fp32_and_computes_in_bf16() -> None:
    model = tiny_llama().to(torch.bfloat16)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    dt.quantize(model, dt.QuantConfig(quant_type="fp4", double_quant=False, blocksize=32))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.compute_dtype == torch.bfloat16 and q_proj.quant_type == "fp4"
    assert model.model.norm.weight.dtype == model.lm_head.weight.dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert q_proj(torch.randn(2, 32)).dtype == torch.float32  # input dtype in, computed in bf16
    assert model(token_ids()).logits.isfinite().all()


def test_quantize_gpt2_conv1d_transposes() -> None:
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    expected = quantize_4bit(conv.weight.detach().t())[0]
    dt.quantize(model, dt.QuantConfig(skip_modules=["lm_head", "c_proj"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and torch.equal(layer.weight, expected)
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"  # skipped by name
    assert model(token_ids()).logits.isfinite().all()


def test_a_skipped_module_keeps_every_layer_inside_it_dense() -> None:
    """Skipping a block (``attn``, as a run skips a pooler it trains in full) skips the layers inside
    it, at any depth; a name only matches whole dotted parts (``attn`` is not ``c_attn``)."""
    model = tiny_gpt2()
    dt.quantize(model, dt.QuantConfig(skip_modules=["h.0.attn", "lm_head"]))
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    assert isinstance(model.transformer.h[0].mlp.c_fc, Linear4bit)
    assert isinstance(model.transformer.h[1].attn.c_attn, Linear4bit)


@pytest.mark.parametrize(("field", "value"), [("quant_type", "nf8"), ("blocksize", 100), ("double_quant", 1),
                                              ("compute_dtype", torch.int8), ("quant_storage", torch.int64),
                                              ("skip_modules", ["", "x"])])
def test_quant_config_errors_name_field_value_and_fix(field: str, value: object) -> None:
    with pytest.raises(dt.ConfigError) as err:
        dt.QuantConfig(**{field: value})  # type: ignore[arg-type]
    text = str(err.value)
    assert f"QuantConfig.{field}=" in text and "Fix:" in text


def test_quantize_refuses_an_adapted_model_without_changing_it() -> None:
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(target_modules=["q_proj"]))
    before = state_hash(model)
    with pytest.raises(dt.QuantError, match="quantize the base first"):
        dt.quantize(model)
    assert state_hash(model) == before


# ---------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_into_an_unquantized_model(tmp_path: Path) -> None:
    model = dt.quantize(tiny_llama(), dt.QuantConfig(quant_type="fp4"))
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    fresh = load_quantized(tiny_llama(seed=1), path)
    assert isinstance(fresh.model.layers[1].mlp.down_proj, Linear4bit)
    ids = token_ids()
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert set(fresh.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    save_quantized(fresh, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_checkpoint_of_another_shape_leaves_the_model_unchanged(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = dt.quantize(tiny_llama())
    save_quantized(model, tmp_path / "m.safetensors")
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=128, max_position_embeddings=64)
    other = LlamaForCausalLM(config)
    before = state_hash(other)
    with pytest.raises(dt.QuantError, match=r"down_proj.*\[32, 64\].*\[32, 96\]"):
        load_quantized(other, tmp_path / "m.safetensors")
    assert state_hash(other) == before and type(other.model.layers[0].mlp.up_proj) is nn.Linear


@pytest.mark.parametrize("quant_type", ["nf4", "int4_group"])
def test_parameter_counts_include_the_4bit_weights(quant_type: str) -> None:
    """A 4-bit layer's packed codes are a buffer; the counts still see its out x in weight values."""
    from deltatune.train.prepare import base_parameters

    model = tiny_llama()
    dense_total = sum(p.numel() for p in model.parameters())
    dt.quantize(model, dt.QuantConfig(quant_type=quant_type, group_size=16))
    assert sum(p.numel() for p in model.parameters()) < dense_total  # what a plain count would report
    assert base_parameters(model) == dense_total
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = dt.trainable_parameters(model)
    assert trainable == dt.adapter_parameters(model, "default") > 0
    assert total == dense_total + trainable and base_parameters(model) == dense_total
