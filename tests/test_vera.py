"""VeRA: peft parity both ways, the shared projection, files, and the config rules.

Parity: peft -> deltatune and deltatune -> peft on tiny GPT-2 (Conv1D), LLaMA (layers of
different in/out sizes, so the slicing of the shared pair matters) and BERT (SEQ_CLS, bias and
modules to save), with random trained vectors, within 1e-5 in fp32; with
``save_projection=False`` the pair is regenerated from the seed on both sides. A fresh adapter's
``vera_A``/``vera_B`` equal peft's bit for bit for the same seed. The invariant battery is in
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
from conftest import perturb, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_t5, token_ids
from deltatune.errors import ConfigError, TargetError
from deltatune.io import adapter_tensors
from test_peft_parity import (assert_parity, config_json, inputs_for, output,
                              peft_extra, tensor_shapes)

import peft
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PARITY = [
    pytest.param(tiny_gpt2, {"r": 4, "target_modules": ["c_attn", "c_fc"]}, id="gpt2"),
    pytest.param(tiny_gpt2, {"r": 4, "target_modules": ["c_attn", "lm_head"]}, id="gpt2-conv1d-then-linear"),
    pytest.param(tiny_llama, {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "projection_prng_key": 7},
                 id="llama-mixed-sizes"),
    pytest.param(tiny_bert, {"r": 6, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", "bias": "vera_only",
                             "d_initial": 0.5}, id="bert-seq-cls-bias"),
    pytest.param(tiny_llama, {"r": 4, "target_modules": ["k_proj", "up_proj"], "save_projection": False,
                              "layers_to_transform": [1], "layers_pattern": "layers"}, id="llama-no-projection-saved"),
    pytest.param(tiny_opt, {"r": 8, "target_modules": "all-linear", "bias": "all"}, id="opt-all-linear-bias-all"),
    pytest.param(tiny_t5, {"r": 8, "target_modules": ["q", "v", "wo"], "vera_dropout": 0.1}, id="t5-dropout"),
]



@pytest.mark.parametrize(("factory", "kwargs"), PARITY)
def test_peft_parity_both_ways(factory: Any, kwargs: dict[str, Any], tmp_path: Path) -> None:
    base, x = factory(), inputs_for(factory)
    base_out = output(base, x)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**copy.deepcopy(kwargs)))
    perturb(theirs, 0)
    theirs.eval().save_pretrained(tmp_path / "peft")
    loaded = dt.load(copy.deepcopy(base), tmp_path / "peft")
    assert_parity(output(loaded, x), output(theirs, x), base_out)
    dt.save(loaded, tmp_path / "resaved")
    resaved, original = ({k: v for k, v in load_file(tmp_path / f / "adapter_model.safetensors").items()
                          if not peft_extra(k)} for f in ("resaved", "peft"))  # less peft's embedding copies
    assert resaved.keys() == original.keys() and all(torch.equal(resaved[k], original[k]) for k in resaved)
    assert ("base_model.vera_A" in original) == kwargs.get("save_projection", True)

    ours = dt.attach(copy.deepcopy(base), dt.VeraConfig(**copy.deepcopy(kwargs)))
    perturb(ours, 1)
    dt.save(ours.eval(), tmp_path / "dt")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dt").eval()
    assert_parity(output(back, x), output(ours, x), base_out)

    ours_json, peft_json = config_json(tmp_path / "dt"), config_json(tmp_path / "peft")
    assert set(ours_json) == set(peft_json) - {"peft_version"}
    for key in ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "fan_in_fan_out", "bias",
                "task_type", "modules_to_save", "layers_to_transform", "layers_pattern"):
        assert ours_json[key] == peft_json[key], key
    assert set(ours_json["target_modules"]) == set(peft_json["target_modules"])
    assert tensor_shapes(tmp_path / "dt") == tensor_shapes(tmp_path / "peft")


@pytest.mark.parametrize(("factory", "targets"), [(tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"]),
                                                  (tiny_llama, ["q_proj", "k_proj", "gate_proj", "down_proj"])])
def test_projection_equals_peft_for_the_seed(factory: Any, targets: list[str]) -> None:
    """Sized to the largest in and out of the targets, drawn A-then-B from the seed: peft's exact numbers."""
    config = {"r": 16, "target_modules": targets, "projection_prng_key": 1234}
    theirs = peft.get_peft_model(factory(), peft.VeraConfig(**config))
    mine = adapter_tensors(dt.attach(factory(), dt.VeraConfig(**config)), "default")
    for key in ("vera_A", "vera_B"):
        want = getattr(theirs.base_model, key)["default"]
        assert mine[f"base_model.{key}"].shape == want.shape and torch.equal(mine[f"base_model.{key}"], want)


def test_one_projection_shared_by_every_layer() -> None:
    model = dt.attach(tiny_llama(), dt.VeraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    deltas = [m for m in model.modules() if type(m).__name__ == "VeraDelta"]
    assert len(deltas) == 4 and len({id(d.projection) for d in deltas}) == 1
    assert not any("vera_A" in k for k in model.state_dict()), "the pair lives outside the model's state dict"
    assert dt.trainable_parameters(model)[0] == sum(4 + d.vera_lambda_b.numel() for d in deltas)


def test_training_step_matches_peft(tmp_path: Path) -> None:
    base, x = tiny_gpt2(), token_ids()
    config = {"r": 4, "target_modules": ["c_attn"], "vera_dropout": 0.2}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**config))
    perturb(theirs, 2)
    theirs.save_pretrained(tmp_path)
    ours = dt.load(copy.deepcopy(base), tmp_path, trainable=True)
    theirs.train(), ours.train()
    torch.manual_seed(5)
    want = theirs(x).logits
    torch.manual_seed(5)
    got = ours(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    want.square().mean().backward()
    got.square().mean().backward()
    mine = {k.removeprefix("base_model.model."): t for k, t in adapter_tensors(ours, "default").items()}
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            key = name.removeprefix("base_model.model.").removesuffix(".default")
            torch.testing.assert_close(mine[key].grad, param.grad, atol=1e-6, rtol=1e-5)


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match="target_modules"):
        dt.VeraConfig()
    with pytest.raises(ConfigError, match="vera_dropout"):
        dt.VeraConfig(target_modules=["q"], vera_dropout=1.5)
    with pytest.raises(ConfigError, match="bias"):
        dt.VeraConfig(target_modules=["q"], bias="lora_only")
    with pytest.raises(TargetError, match="Linear and transformers Conv1D"):
        dt.attach(tiny_gpt2(), dt.VeraConfig(r=4, target_modules=["wte"]))


def test_peft_bf16_to_deltatune(tmp_path: Path) -> None:
    """On a bf16 base (adapter and projection kept in fp32, as peft does) the outputs are bit-equal."""
    base, x = tiny_llama().to(torch.bfloat16), token_ids()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    perturb(theirs, 0)
    theirs.eval().save_pretrained(tmp_path)
    want = output(theirs, x)
    assert (want - output(base, x)).abs().max() > 1e-1
    assert torch.equal(output(dt.load(copy.deepcopy(base), tmp_path), x), want)
