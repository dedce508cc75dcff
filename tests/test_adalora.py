"""AdaLoRA: peft parity both ways, the rank allocator against peft's ``update_and_allocate``, the
rank pattern in files, and the config rules.

Parity: random P, Λ, Q on tiny LLaMA, GPT-2 (Conv1D) and the ConvNet (Conv2d + Linear), within
1e-5 both ways. Allocator: one adapter trained side by side in peft and deltatune with the same
SGD steps (loss plus the orthogonality term, allocation after backward) gives the same losses,
the same masks at every step and the same final rank pattern; both files then hold the same cut
tensors and load into the other library with equal outputs. The invariant battery is in
test_invariants.py. peft is only imported here, as a test oracle.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import conv_net, perturb, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, token_ids
from deltatune.errors import AdapterError, ConfigError, TargetError
from test_peft_parity import assert_parity, config_json, inputs_for, output, tensor_shapes

import peft
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SCHEDULE = {"init_r": 4, "target_r": 2, "total_step": 8, "tinit": 1, "tfinal": 2, "deltaT": 2}
PARITY = [
    pytest.param(tiny_llama, {"target_modules": ["q_proj", "v_proj"], "lora_alpha": 16}, id="llama"),
    pytest.param(tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "bias": "lora_only", "lora_dropout": 0.1},
                 id="gpt2-bias-dropout"),
    pytest.param(conv_net, {"target_modules": ["conv2", "pointwise", "head"]}, id="convnet-conv2d"),
    pytest.param(tiny_t5, {"target_modules": "all-linear"}, id="t5-all-linear"),
    pytest.param(tiny_bert, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "layers_to_transform": [1],
                             "layers_pattern": "layer", "bias": "all"}, id="bert-seq-cls-layers-bias-all"),
]



def configs(kwargs: dict[str, Any]) -> tuple[Any, dt.AdaLoraConfig]:
    full = {**SCHEDULE, "init_lora_weights": False, **kwargs}
    return peft.AdaLoraConfig(**copy.deepcopy(full)), dt.AdaLoraConfig(**copy.deepcopy(full))


@pytest.mark.parametrize(("factory", "kwargs"), PARITY)
def test_peft_parity_both_ways(factory: Any, kwargs: dict[str, Any], tmp_path: Path) -> None:
    base, x = factory(), inputs_for(factory)
    base_out = output(base, x)
    theirs_config, ours_config = configs(kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)
    perturb(theirs, 0)
    theirs.eval().save_pretrained(tmp_path / "peft")
    assert_parity(output(dt.load(copy.deepcopy(base), tmp_path / "peft"), x), output(theirs, x), base_out)

    ours = dt.attach(copy.deepcopy(base), ours_config)
    perturb(ours, 1)
    dt.save(ours.eval(), tmp_path / "dt")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dt").eval()
    assert_parity(output(back, x), output(ours, x), base_out)
    ours_json, peft_json = config_json(tmp_path / "dt"), config_json(tmp_path / "peft")
    assert set(ours_json) == set(peft_json) - {"peft_version"}
    for key in (*SCHEDULE, "peft_type", "beta1", "beta2", "orth_reg_weight", "lora_alpha", "bias", "fan_in_fan_out",
                "rank_pattern", "r"):
        assert ours_json[key] == peft_json[key], key
    assert tensor_shapes(tmp_path / "dt") == tensor_shapes(tmp_path / "peft")  # less peft's duplicate bias keys


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x, labels=x).loss


def test_allocator_matches_peft_update_and_allocate(tmp_path: Path) -> None:
    """Same start, same SGD steps: equal losses (orthogonality term included), masks and rank pattern."""
    base, x = tiny_llama(), token_ids()
    kwargs = {**SCHEDULE, "target_modules": ["q_proj", "v_proj", "down_proj"], "orth_reg_weight": 0.3,
              "init_lora_weights": False}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "start")
    ours = dt.load(copy.deepcopy(base), tmp_path / "start", trainable=True)
    scheduler = dt.AdaLoraScheduler(ours)
    mine = {k.removeprefix("base_model.model."): t for k, t in dt.io.adapter_tensors(ours, "default").items()}
    pairs = [(mine[n.removeprefix("base_model.model.").removesuffix(".default")], p)
             for n, p in theirs.named_parameters() if p.requires_grad]
    assert len(pairs) == 3 * 6
    masks = []
    for step in range(SCHEDULE["total_step"]):
        want = theirs.base_model(x, labels=x).loss  # AdaLoraModel.forward adds orth_reg_weight * its penalty
        got = lm_loss(ours, x) + scheduler.orth_loss()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        want.backward()
        got.backward()
        with torch.no_grad():
            for a, b in pairs:
                a.sub_(0.5 * a.grad)
                b.sub_(0.5 * b.grad)
        theirs.base_model.update_and_allocate(step)
        scheduler.step(step)
        for a, b in pairs:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            if a.shape[1] == 1:  # Λ: masked entries are exactly zero on both sides
                assert torch.equal(a == 0, b == 0)
        masks.append(sum(int((a == 0).sum()) for a, _ in pairs if a.shape[1] == 1))
        theirs.zero_grad(), ours.zero_grad()
    assert masks[0] == 0 and masks[-1] == 6 * 4 - 6 * 2, f"masked triplets per step: {masks}"
    want_pattern = theirs.peft_config["default"].rank_pattern
    got_pattern = ours.deltatune_state.configs["default"].rank_pattern
    assert {k.replace(".default", ""): list(v) for k, v in want_pattern.items()} == {k: list(v) for k, v in got_pattern.items()}

    theirs.save_pretrained(tmp_path / "peft")
    dt.save(ours, tmp_path / "dt")
    assert config_json(tmp_path / "dt")["rank_pattern"] == config_json(tmp_path / "peft")["rank_pattern"]
    files = [load_file(tmp_path / f / "adapter_model.safetensors") for f in ("dt", "peft")]
    assert files[0].keys() == files[1].keys()
    for key in files[0]:
        assert files[0][key].shape == files[1][key].shape, key
        torch.testing.assert_close(files[0][key], files[1][key], atol=1e-6, rtol=1e-5)
    assert sum(t.shape[0] for k, t in files[0].items() if k.endswith("lora_E")) == 6 * 2


def test_cut_ranks_load_both_ways(tmp_path: Path) -> None:
    """A file with a rank pattern (ranks 0 included) loads into the cut shapes, in both libraries."""
    base, x = tiny_gpt2(), token_ids()
    ours = dt.attach(copy.deepcopy(base), configs({"target_modules": ["c_attn", "c_fc"]})[1])
    perturb(ours, 3)
    scheduler = dt.AdaLoraScheduler(ours)
    for step in range(SCHEDULE["total_step"] + 1):
        lm_loss(ours, x).backward()
        scheduler.step(step)
        ours.zero_grad()
    flags = ours.deltatune_state.configs["default"].rank_pattern
    dt.save(ours.eval(), tmp_path)
    loaded = dt.load(copy.deepcopy(base), tmp_path)
    for key, layer in ((k, m) for k, m in loaded.named_modules() if type(m).__name__ == "DeltaLayer"):
        assert layer.deltas["default"].lora_A.shape[0] == sum(flags[f"{key}.lora_E"])
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_parity(output(loaded, x), output(ours, x), output(base, x))
    assert_parity(output(back, x), output(ours, x), output(base, x))


def test_budget_schedule_matches_peft() -> None:
    for schedule in (SCHEDULE, {"init_r": 12, "target_r": 8, "total_step": 50, "tinit": 5, "tfinal": 10, "deltaT": 3}):
        config = {**schedule, "target_modules": ["q_proj", "v_proj"]}
        theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**config)).base_model.rankallocator
        ours = dt.AdaLoraScheduler(dt.attach(tiny_llama(), dt.AdaLoraConfig(**config)))
        assert [ours.budget(s) for s in range(schedule["total_step"] + 2)] == \
            [theirs.budget_schedule(s) for s in range(schedule["total_step"] + 2)]


def test_scheduler_and_config_errors() -> None:
    model = dt.attach(tiny_llama(), dt.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    with pytest.raises(AdapterError, match="after loss.backward"):
        dt.AdaLoraScheduler(model).step(1)
    with pytest.raises(AdapterError, match="exactly one trainable AdaLoRA adapter"):
        dt.AdaLoraScheduler(dt.attach(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"])))
    with pytest.raises(ConfigError, match="total_step"):
        dt.AdaLoraConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="tinit"):
        dt.AdaLoraConfig(target_modules=["q_proj"], total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ConfigError, match="init_r"):
        dt.AdaLoraConfig(target_modules=["q_proj"], total_step=10, r=4)
    with pytest.raises(ConfigError, match="target_modules"):
        dt.AdaLoraConfig(total_step=10)
    with pytest.raises(TargetError, match="Conv2d layers only"):
        dt.attach(conv_net(), dt.AdaLoraConfig(target_modules=["conv1"], total_step=10))


def test_peft_bf16_to_deltatune(tmp_path: Path) -> None:
    """On a bf16 base (adapter in fp32) the outputs are bit-equal. Only P, Λ, Q are perturbed: on
    a bf16 base peft leaves its unsaved ``ranknum`` trainable, which a reload could not reproduce."""
    base, x = tiny_llama().to(torch.bfloat16), token_ids()
    theirs = peft.get_peft_model(copy.deepcopy(base), configs({"target_modules": ["q_proj", "v_proj"]})[0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(theirs.named_parameters()):
            if ".lora_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param))
    theirs.eval().save_pretrained(tmp_path)
    want = output(theirs, x)
    assert (want - output(base, x)).abs().max() > 1e-1
    assert torch.equal(output(dt.load(copy.deepcopy(base), tmp_path), x), want)
