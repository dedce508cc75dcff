"""LoRA on mixture-of-experts bases: peft's ``target_parameters`` on fused 3-D expert weights.

Oracles: peft 0.21 (its ``lora.ParamWrapper``: same weights, same outputs, files both ways), a
dense reference (each expert's weight replaced by ``W_e + s B_e A_e`` in a plain copy of the
experts module), and the model itself (merged vs unmerged, disabled vs the base, a routed row vs
its adapter alone).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from deltatune.io import adapter_tensors
from deltatune.param_site import ParameterLayer
from battery_cases import restore_bound
from conftest import _quiet, close, perturb, state_hash, token_ids

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             num_experts_per_tok=2, max_position_embeddings=32)
CONFIGS: dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **SMALL),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=4,
                                                     shared_expert_intermediate_size=20, **SMALL),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=24, num_experts=4, **SMALL),
    "gpt_oss": lambda: transformers.GptOssConfig(intermediate_size=24, num_local_experts=4, head_dim=8, **SMALL),
}
"""Architectures whose experts are fused 3-D parameters in transformers 5.23; GPT-OSS stores each expert
``(in, out)`` (``is_transposed``), the others ``(out, in)``."""
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny(arch: str = "mixtral", seed: int = 0) -> nn.Module:
    _quiet()
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def ids() -> Tensor:
    return token_ids(3, 7, vocab=VOCAB)


@torch.no_grad()
def logits(model: nn.Module, batch: Tensor | None = None) -> Tensor:
    return model(batch if batch is not None else ids()).logits


def peft_model(base: nn.Module, adapters: dict[str, dict[str, Any]]) -> Any:
    """peft's model with the named adapters (random A and B, then perturbed per adapter), first active."""
    names = list(adapters)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**adapters[name]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if "lora_" in key:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def lora(**extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(target_modules=["q_proj"], target_parameters=EXPERTS, r=2, lora_alpha=4,
                                    init_lora_weights=False)
    return settings | extra


# ------------------------------------------------------------------------------------ peft parity

@pytest.mark.parametrize("arch", list(CONFIGS))
def test_peft_folder_loads_and_ours_loads_in_peft(arch: str, tmp_path: Path) -> None:
    base = tiny(arch)
    reference = peft_model(base, {"default": lora(rank_pattern={"down_proj": 3}, use_rslora=True)})
    reference.save_pretrained(tmp_path / "peft")
    expected = logits(reference)
    assert not close(expected, logits(base))  # the adapter changes the output

    ours = dt.load(copy.deepcopy(base), tmp_path / "peft")
    assert torch.equal(logits(ours), expected)  # the same operations as peft's, in the same order

    dt.save(ours, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(written[k], theirs[k]) for k in theirs)
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours_config["target_parameters"] == sorted(peft_config["target_parameters"])  # peft writes a set's order
    assert set(ours_config) >= set(peft_config) - {"auto_mapping", "peft_version"}

    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert torch.equal(logits(again), expected)


def test_keys_follow_peft_nesting_first_registered_parameter_innermost() -> None:
    model = dt.attach(tiny(), dt.LoraConfig(target_modules=[], target_parameters=["down_proj", "gate_up_proj"], r=2))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ParameterLayer) and experts.view.name == "down_proj"
    assert isinstance(experts.base_layer, ParameterLayer) and experts.base_layer.view.name == "gate_up_proj"
    keys = {k: tuple(v.shape) for k, v in adapter_tensors(model, "default").items() if ".0." in k}
    prefix = "base_model.model.model.layers.0.mlp.experts."
    assert keys == {prefix + "lora_A.weight": (8, 24), prefix + "lora_B.weight": (16, 8),  # r * experts = 8
                    prefix + "base_layer.lora_A.weight": (8, 16), prefix + "base_layer.lora_B.weight": (48, 8)}


def test_gradients_equal_peft() -> None:
    base = tiny()
    reference = peft_model(base, {"default": lora()}).train()
    ours = dt.attach(copy.deepcopy(base), dt.LoraConfig(**lora()))
    ours_params = adapter_tensors(ours, "default")
    with torch.no_grad():
        for key, param in reference.named_parameters():
            if "lora_" in key:
                ours_params[key.replace(".default", "")].copy_(param)
    batch = ids()
    for model in (reference, ours):
        model(batch, labels=batch).loss.backward()
    theirs = {k.replace(".default", ""): p.grad for k, p in reference.named_parameters() if "lora_" in k}
    assert theirs and all(ours_params[k].grad is not None and close(ours_params[k].grad, g) for k, g in theirs.items())
    assert all(p.grad is None for k, p in ours.named_parameters() if not p.requires_grad)


def test_bf16_base_matches_peft_and_merges() -> None:
    """peft keeps the factors in bf16 and we in fp32; with peft's values both fold the same bf16 numbers."""
    base = tiny().to(torch.bfloat16)
    reference = peft_model(base, {"default": lora()})
    ours = dt.attach(copy.deepcopy(base), dt.LoraConfig(**lora()))
    state = adapter_tensors(ours, "default")
    assert all(t.dtype == torch.float32 for t in state.values())
    with torch.no_grad():
        for key, param in reference.named_parameters():
            if "lora_" in key:
                state[key.replace(".default", "")].copy_(param)
    adapted = logits(ours)
    assert adapted.dtype == torch.bfloat16 and torch.equal(adapted, logits(reference))
    dt.merge(ours)
    assert close(logits(ours), adapted, torch.bfloat16)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_zero_b_inits_start_at_the_base_exactly(init: bool | str) -> None:
    base = tiny("gpt_oss")
    model = dt.attach(copy.deepcopy(base), dt.LoraConfig(target_modules=[], target_parameters=EXPERTS, r=2,
                                                         init_lora_weights=init))
    a = model.model.layers[0].mlp.experts.delta("default").A
    assert a.abs().sum() > 0 and torch.equal(logits(model), logits(base))


# ------------------------------------------------------------------------------------ the maths

def test_each_expert_gets_its_own_rank_r_change_as_a_dense_oracle() -> None:
    model = dt.attach(tiny(), dt.LoraConfig(target_modules=[], target_parameters=EXPERTS, r=3, lora_alpha=6,
                                            init_lora_weights=False))
    wrapper = model.model.layers[1].mlp.experts
    inner = wrapper.base_layer
    experts = inner.base_layer
    dense = copy.deepcopy(experts)
    with torch.no_grad():
        for layer in (wrapper, inner):
            delta = layer.delta("default")
            A, B, E, r = delta.A, delta.B, 4, 3
            for e in range(E):  # expert e: A's rows e*r..e*r+r-1, B's columns e, E+e, 2E+e
                change = 2.0 * B[:, e::E] @ A[e * r:(e + 1) * r]
                getattr(dense, layer.view.name)[e] += change
                assert close(delta.delta_weight(A)[e], change)
    hidden = torch.randn(10, 16)
    top_k = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    with torch.no_grad():
        assert close(wrapper(hidden, top_k, weights), dense(hidden, top_k, weights))
        assert not close(experts(hidden, top_k, weights), dense(hidden, top_k, weights))


def test_a_plain_2d_parameter_is_one_expert() -> None:
    base = tiny("qwen2_moe")
    config = dict(target_modules=[], target_parameters=["shared_expert.up_proj.weight"], r=2, init_lora_weights=False)
    reference = peft_model(base, {"default": config})
    ours = dt.attach(copy.deepcopy(base), dt.LoraConfig(**config))
    state = adapter_tensors(ours, "default")
    with torch.no_grad():
        for key, param in reference.named_parameters():
            if "lora_" in key:
                state[key.replace(".default", "")].copy_(param)
    assert torch.equal(logits(ours), logits(reference))


# ------------------------------------------------------------------------------------ merge, disable, remove

def test_merge_unmerge_unload_and_disabled() -> None:
    base = tiny()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.attach(copy.deepcopy(base), dt.LoraConfig(**lora()))
    perturb(model)
    adapted, plain = logits(model), logits(base)
    with dt.disabled(model):
        assert torch.equal(logits(model), plain)
    dt.merge(model)
    assert close(logits(model), adapted)
    dt.unmerge(model)
    assert close(logits(model), adapted)
    for key, value in base.state_dict().items():
        live = dict(_base_named(model))[key]
        bound = restore_bound(original[key].double(), live.double(), 1.0, torch.float32) + 1e-7
        assert ((live.double() - original[key].double()).abs() <= bound).all(), key
    unloaded = dt.unload(model)
    assert not any(isinstance(m, ParameterLayer) for m in unloaded.modules())
    assert type(unloaded.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert close(logits(unloaded), adapted)


def _base_named(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Base tensors under their names without wrappers."""
    out = []
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if "deltas" not in parts:
            out.append((".".join(p for p in parts if p != "base_layer"), value))
    return out


def test_unload_without_merging_and_delete_give_the_base_back_bit_for_bit() -> None:
    base = tiny()
    expected = state_hash(base)
    model = dt.attach(copy.deepcopy(base), dt.LoraConfig(**lora()))
    perturb(model)
    assert state_hash(dt.unload(model, merge=False)) == expected
    model = dt.attach(copy.deepcopy(base), dt.LoraConfig(**lora()), name="a")
    dt.attach(model, dt.LoraConfig(**lora()), name="b")
    dt.merge(model, "a")
    dt.delete_adapter(model, "a")
    dt.delete_adapter(model, "b")
    assert not any(isinstance(m, ParameterLayer) for m in model.modules())
    assert torch.allclose(logits(model), logits(base), atol=1e-6)


def test_several_adapters_sum_and_switch_as_in_peft(tmp_path: Path) -> None:
    base = tiny()
    reference = peft_model(base, {"default": lora(), "b": lora(r=3)})
    reference.save_pretrained(tmp_path)
    model = dt.load(copy.deepcopy(base), tmp_path)
    dt.load(model, tmp_path / "b", name="b")
    for active in ("default", "b", ["default", "b"]):
        reference.base_model.set_adapter(active)
        dt.set_active(model, active)
        same = torch.equal if isinstance(active, str) else close  # a sum of layer changes: peft's order differs
        assert same(logits(model), logits(reference)), active
    dt.merge(model)
    assert close(logits(model), logits(reference))
    dt.unmerge(model)
    dt.delete_adapter(model, "default")
    reference.base_model.set_adapter("b")
    assert close(logits(model), logits(reference))


# ------------------------------------------------------------------------------------ routing

def test_routed_rows_equal_each_adapter_alone() -> None:
    base = tiny()
    model = dt.attach(copy.deepcopy(base), dt.LoraConfig(**lora()), name="a")
    dt.attach(model, dt.LoraConfig(**lora(r=3)), name="b")
    perturb(model, seed=4)
    batch = ids()
    rows = ["a", None, "b"]
    with dt.routing(model, rows):
        routed = logits(model, batch)
    for i, name in enumerate(rows):
        if name is None:
            with dt.disabled(model):
                alone = logits(model, batch[i:i + 1])
        else:
            dt.set_active(model, name)
            alone = logits(model, batch[i:i + 1])
        assert (routed[i] - alone[0]).abs().max() <= 1e-5, name
    dt.set_active(model, dt.BatchSplit("a", "b", sizes=[2, 1]))
    split = logits(model, batch)
    dt.set_active(model, "b")
    assert (split[2] - logits(model, batch[2:])[0]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize(("config", "error", "words"), [
    (dict(target_parameters=["experts.up_proj"]), dt.TargetError, "match no parameter"),
    (dict(target_parameters=["input_layernorm.weight"]), dt.TargetError, "1-D"),
    (dict(target_parameters=EXPERTS, bias="lora_only"), dt.ConfigError, "lora_only"),
    (dict(target_parameters=EXPERTS, lora_dropout=0.1), dt.ConfigError, "dropout"),
    (dict(target_parameters=EXPERTS, use_dora=True), dt.ConfigError, "DoRA"),
    (dict(target_parameters=EXPERTS, init_lora_weights="pissa"), dt.ConfigError, "init_lora_weights"),
    (dict(target_parameters="gate_up_proj"), dt.ConfigError, "list of parameter names"),
])
def test_bad_targets_are_refused_and_change_nothing(config: dict[str, Any], error: type[Exception], words: str) -> None:
    model = tiny()
    before = state_hash(model)
    with pytest.raises(error, match=words):
        dt.attach(model, dt.LoraConfig(target_modules=[], **config))
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")


def test_a_second_adapter_must_target_the_same_parameters() -> None:
    model = dt.attach(tiny(), dt.LoraConfig(**lora()), name="a")
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="same"):
        dt.attach(model, dt.LoraConfig(target_modules=[], target_parameters=["down_proj"]), name="b")
    with pytest.raises(dt.TargetError, match="same"):  # q_proj carries a layer change already
        dt.attach(model, dt.LoraConfig(target_modules=[], target_parameters=["q_proj.weight"]), name="b")
    with pytest.raises(dt.TargetError, match="cannot adapt"):  # the experts module is no layer
        dt.attach(model, dt.LoraConfig(target_modules=["experts"]), name="b")
    assert state_hash(model) == before and dt.active_adapters(model) == ("a",)
    fresh = tiny()
    with pytest.raises(dt.TargetError, match="both as a layer"):
        dt.attach(fresh, dt.LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))
    assert not hasattr(fresh, "deltatune_state")


def test_an_average_is_refused_on_a_parameter() -> None:
    model = dt.attach(tiny(), dt.LoraConfig(**lora()), name="a")
    dt.attach(model, dt.LoraConfig(**lora()), name="b")
    dt.set_active(model, dt.Average("a", "b", weights=[0.5, 0.5]))
    with pytest.raises(dt.AdapterError, match="not defined"):
        logits(model)
