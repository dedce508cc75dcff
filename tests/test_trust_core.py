"""Refusals that must say what, where and how to fix, and leave the model bit for bit as it was:
PiSSA / OLoRA with a rank above the layer's, a bad regular expression in alpha_pattern, and
quantizing a model whose weights hold NaN or inf."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from conftest import tiny_gpt2, tiny_llama, token_ids
from deltatune.quant import Linear4bit
from deltatune.state import STATE_ATTR


@dataclass(frozen=True)
class Snapshot:
    """Everything a failed call must leave as it was."""

    state: dict[str, Tensor]
    parameters: dict[str, tuple[int, Tensor, bool]]  # name -> (object id, value, requires_grad)
    buffers: dict[str, tuple[int, Tensor]]  # including non-persistent buffers (not in the state dict)
    modules: list[tuple[str, type]]
    adapted: bool  # whether deltatune's state is on the model


def _copy(t: Tensor) -> Tensor:
    return t.detach().clone()


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        {k: _copy(v) for k, v in model.state_dict().items()},
        {k: (id(p), _copy(p), p.requires_grad) for k, p in model.named_parameters(remove_duplicate=False)},
        {k: (id(b), _copy(b)) for k, b in model.named_buffers(remove_duplicate=False)},
        [(k, type(m)) for k, m in model.named_modules(remove_duplicate=False)],
        STATE_ATTR in model.__dict__,
    )


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (torch.equal on the bytes), so NaN counts as equal to the same NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    after = snapshot(model)
    assert after.modules == before.modules
    assert list(after.state) == list(before.state)
    assert all(same_bits(after.state[k], v) for k, v in before.state.items())
    assert list(after.parameters) == list(before.parameters)
    for key, (ident, value, grad) in before.parameters.items():
        now_id, now, now_grad = after.parameters[key]
        assert now_id == ident and now_grad == grad and same_bits(now, value), key
    assert list(after.buffers) == list(before.buffers)
    for key, (ident, value) in before.buffers.items():
        assert after.buffers[key][0] == ident and same_bits(after.buffers[key][1], value), key
    assert after.adapted == before.adapted


# ------------------------------------------------------------------- PiSSA / OLoRA rank too big

K_PROJ = "model.layers.0.self_attn.k_proj"  # tiny_llama: (out, in) = (16, 32), so at most rank 16
INITS = ["pissa", "pissa_niter_2", "olora"]


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_weight_init_with_r_above_the_layer_is_a_config_error(init: str, dora: bool) -> None:
    model = tiny_llama()
    before = snapshot(model)
    config = dt.LoraConfig(r=17, target_modules=("q_proj", "k_proj"), init_lora_weights=init, use_dora=dora)
    with pytest.raises(dt.ConfigError) as caught:
        dt.attach(model, config)
    err = caught.value
    assert err.field == "r" and err.value == 17
    text = str(err)
    assert text.startswith("LoraConfig.r=17 is invalid")
    for part in (repr(init), repr(K_PROJ), "(16, 32)", "min(16, 32) = 16", "lower r to at most 16",
                 f"rank_pattern={{{K_PROJ!r}: 16}}"):
        assert part in text, part
    assert_unchanged(model, before)


@pytest.mark.parametrize("init", INITS)
def test_weight_init_with_a_rank_pattern_above_the_layer_names_the_entry(init: str) -> None:
    model = tiny_llama()
    before = snapshot(model)
    config = dt.LoraConfig(r=4, rank_pattern={"k_proj": 20}, target_modules=("q_proj", "k_proj"),
                           init_lora_weights=init)
    with pytest.raises(dt.ConfigError) as caught:
        dt.attach(model, config)
    err = caught.value
    assert err.field == "rank_pattern" and err.value == {"k_proj": 20}
    assert re.search(r"rank_pattern entry 'k_proj'.*lower that entry to at most 16", str(err))
    assert repr(K_PROJ) in str(err) and "(16, 32)" in str(err)
    assert_unchanged(model, before)


@pytest.mark.parametrize("init", INITS)
def test_weight_init_fix_from_the_message_works(init: str) -> None:
    """r equal to min(out, in) is allowed, and the suggested rank_pattern makes the config attach."""
    model = tiny_llama()
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    config = dt.LoraConfig(r=17, lora_alpha=17, target_modules=("q_proj", "k_proj"), init_lora_weights=init,
                           rank_pattern={"k_proj": 16})
    dt.attach(model, config)
    k_proj: Any = model.get_submodule(K_PROJ)
    assert k_proj.deltas["default"].A.shape == (16, 32)
    with torch.no_grad():  # PiSSA / OLoRA move W's top part into the adapter: same function at the start
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)


def test_default_init_allows_r_above_the_layer() -> None:
    """Only inits that take directions from W are bounded by its rank; peft allows any r otherwise."""
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(r=40, target_modules=("k_proj",)))


# ------------------------------------------------------------------- pattern keys name their field

@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", ["(", "q_proj[", "*"])
def test_bad_pattern_key_names_its_own_field(field: str, key: str) -> None:
    with pytest.raises(dt.ConfigError) as caught:
        kwargs: dict[str, Any] = {field: {key: 4}}
        dt.LoraConfig(**kwargs)
    assert caught.value.field == field
    text = str(caught.value)
    assert text.startswith(f"LoraConfig.{field}=") and repr(key) in text and "not a valid regular expression" in text
    assert "Fix:" in text


def test_bad_alpha_pattern_key_in_a_file_names_alpha_pattern() -> None:
    data = dt.LoraConfig(r=4).to_peft_dict() | {"alpha_pattern": {"q_proj(": 8}}
    with pytest.raises(dt.ConfigError, match=r"^LoraConfig\.alpha_pattern=") as caught:
        dt.LoraConfig.from_peft_dict(data)
    assert caught.value.field == "alpha_pattern"


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_non_string_pattern_key_is_a_config_error(field: str) -> None:
    with pytest.raises(dt.ConfigError) as caught:
        kwargs: dict[str, Any] = {field: {1: 4}}
        dt.LoraConfig(**kwargs)
    assert caught.value.field == field and "not a string" in str(caught.value)


# ------------------------------------------------------------------- quantizing non-finite weights

DOWN_PROJ = "model.layers.1.mlp.down_proj"  # the last quantized layer of the walk: (out, in) = (32, 64)


def test_quantize_refuses_non_finite_weights_and_changes_nothing() -> None:
    model = tiny_llama()
    weight: Any = model.get_submodule(DOWN_PROJ).weight
    with torch.no_grad():
        weight[3, 5] = float("inf")
        weight[3, 9] = float("-inf")
        weight[7, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(dt.QuantError) as caught:
        dt.quantize(model)
    text = str(caught.value)
    for part in (repr(DOWN_PROJ), "shape [32, 64]", "3 non-finite values", "the first inf at weight[3, 5]",
                 "Nothing was changed", "Fix:", f"skip_modules={['lm_head', DOWN_PROJ]!r}"):
        assert part in text, part
    assert_unchanged(model, before)  # the earlier layers of the walk too: none became Linear4bit
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_quantize_names_the_stored_layout_index_of_a_gpt2_conv1d() -> None:
    """A transformers Conv1D stores (in, out); the index given is into the module's own weight."""
    model = tiny_gpt2()
    weight: Any = model.get_submodule("transformer.h.0.attn.c_attn").weight
    with torch.no_grad():
        weight[2, 40] = float("nan")
    before = snapshot(model)
    with pytest.raises(dt.QuantError, match=re.escape(
            "'transformer.h.0.attn.c_attn': its weight (shape [32, 96]) holds 1 non-finite value, the first nan "
            "at weight[2, 40]")):
        dt.quantize(model)
    assert_unchanged(model, before)


def test_quantize_fix_from_the_message_works() -> None:
    model = tiny_llama()
    weight: Any = model.get_submodule(DOWN_PROJ).weight
    with torch.no_grad():
        weight[0, 0] = float("inf")
    dt.quantize(model, dt.QuantConfig(skip_modules=("lm_head", DOWN_PROJ)))
    assert type(model.get_submodule(DOWN_PROJ)) is nn.Linear
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), Linear4bit)
