"""DoRA (``LoraConfig(use_dora=True)``): peft parity both ways, and the magnitude's init per kind.

Parity: peft's DoRA adapters (random A, B and magnitude) load into deltatune and give peft's
outputs within 1e-5 in fp32, and deltatune's load into peft the same way, on tiny LLaMA,
GPT-2 (Conv1D and the tied embedding), BERT (SEQ_CLS) and a net of Embedding / Conv1d / Conv2d /
Conv3d / Linear layers; config keys and safetensors keys / shapes equal peft's. Also: training
mode with dropout matches peft on the same dropout mask.

Per base kind, fp32 and bf16: a fresh magnitude is peft's ``||W||`` per output, in peft's shape.
The invariant battery (identity at init, the dense fp64 oracle ``m (W + s B A) / ||W + s B A||``,
merge / unmerge, save / load, disabled, parameter count, gradients, compositions) runs for DoRA
in test_invariants.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from battery_cases import DTYPES, KIND, METHOD, Kind, Single, adapted, base_module, build, canonical_weight, \
    delta_of, wrapper
from conftest import TOLERANCES, conv_net, tiny_bert, tiny_gpt2, tiny_llama
from deltatune.io import adapter_tensors
from deltatune.methods.dora import DoraDelta
from test_peft_parity import (Case, Saved, assert_parity, case_params, comparable, config_json,
                              inputs_for, max_diff, output, saved, tensor_shapes)

import peft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class ConvNet3d(nn.Module):
    """A Conv3d between two linear maps, for peft's DoRA on Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 8)
        self.conv3 = nn.Conv3d(1, 3, kernel_size=(2, 3, 3), padding=1)
        self.head = nn.Linear(3, 5)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)  # (b, t, 8)
        v = self.conv3(h.view(h.shape[0], 1, 2, -1, 4)).mean((-1, -2, -3))  # (b, 3)
        return self.head(v)


def conv_net3d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet3d().eval()


def dora(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "use_dora": True}


CASES = [
    Case("llama-qv", tiny_llama, dora({"target_modules": ["q_proj", "v_proj"]})),
    Case("llama-all-linear", tiny_llama, dora({"target_modules": "all-linear"})),
    Case("llama-rslora-pattern", tiny_llama, dora({"target_modules": ["q_proj", "v_proj"], "use_rslora": True,
                                                   "rank_pattern": {"layers.1.self_attn.q_proj": 2}})),
    Case("gpt2-c_attn", tiny_gpt2, dora({"target_modules": ["c_attn"]})),
    Case("gpt2-all-linear-bias-lora_only", tiny_gpt2, dora({"target_modules": "all-linear", "bias": "lora_only"})),
    Case("gpt2-embedding", tiny_gpt2, dora({"target_modules": ["wte", "c_attn"]})),
    Case("bert-seq-cls", tiny_bert, dora({"target_modules": ["query", "value"], "task_type": "SEQ_CLS"})),
    Case("convnet", conv_net, dora({"target_modules": ["conv1", "conv2", "pointwise", "embed", "head"]})),
    Case("convnet3d", conv_net3d, dora({"target_modules": ["conv3", "embed", "head"]})),
]


def inputs(case: Case) -> Tensor:
    return inputs_for(case.factory)


# ------------------------------------------------------------------------------------ peft parity


@pytest.mark.parametrize("case", case_params(CASES))
def test_peft_to_deltatune(case: Case, saved: Saved) -> None:
    folder, want = saved(case, "peft")
    base, x = case.factory(), inputs(case)
    model = dt.load(copy.deepcopy(base), folder)
    assert any(isinstance(m, DoraDelta) for m in model.modules())
    assert_parity(output(model, x), want, output(base, x))


@pytest.mark.parametrize("case", case_params(CASES))
def test_deltatune_to_peft(case: Case, saved: Saved) -> None:
    folder, want = saved(case, "dt")
    base, x = case.factory(), inputs(case)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    assert_parity(output(model, x), want, output(base, x))


@pytest.mark.parametrize("case", case_params(CASES))
def test_config_json_matches_peft(case: Case, saved: Saved) -> None:
    ours, theirs = config_json(saved(case, "dt")[0]), config_json(saved(case, "peft")[0])
    assert set(ours) == set(theirs) - {"peft_version"}
    assert ours["use_dora"] is theirs["use_dora"] is True
    fields = ("peft_type", "r", "lora_alpha", "target_modules", "bias", "use_rslora", "rank_pattern",
              "fan_in_fan_out", "task_type", "modules_to_save")
    assert {f: comparable(ours[f]) for f in fields} == {f: comparable(theirs[f]) for f in fields}


@pytest.mark.parametrize("case", case_params(CASES))
def test_safetensors_layout_matches_peft(case: Case, saved: Saved, tmp_path: Path) -> None:
    peft_folder, _ = saved(case, "peft")
    dt.save(dt.load(case.factory(), peft_folder), tmp_path)
    want = tensor_shapes(peft_folder)
    assert any(k.endswith(".lora_magnitude_vector") for k in want)
    assert tensor_shapes(tmp_path) == want
    assert tensor_shapes(saved(case, "dt")[0]) == want
    resaved, original = (load_file(f / "adapter_model.safetensors") for f in (tmp_path, peft_folder))
    assert all(torch.equal(resaved[k], original[k]) for k in resaved)


def test_fresh_magnitude_matches_peft_init() -> None:
    """Without perturbation, m is peft's ||W + s B A|| for every kind (B = 0, or A = 0 for embeddings)."""
    for factory, targets in [(conv_net, ["conv1", "conv2", "pointwise", "embed", "head"]), (tiny_gpt2, ["c_attn"]),
                             (conv_net3d, ["conv3"])]:
        config = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": True}
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(**config))
        ours = dt.attach(factory(), dt.LoraConfig(**config))
        want = {n.split("base_model.model.")[1].replace(".default.weight", ""): p
                for n, p in theirs.named_parameters() if "lora_magnitude_vector" in n}
        got = {k.removeprefix("base_model.model."): t for k, t in adapter_tensors(ours, "default").items()
               if "lora_magnitude_vector" in k}
        assert set(got) == set(want)
        for key, value in got.items():
            torch.testing.assert_close(value, want[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_step_matches_peft(dropout: float, tmp_path: Path) -> None:
    """Train mode (dropout recomputes W x on the dropped input, as in peft): outputs and gradients match."""
    base = Single(nn.Linear(16, 12))
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["layer"], "use_dora": True, "init_lora_weights": False,
              "lora_dropout": dropout}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    theirs.save_pretrained(tmp_path)
    ours = dt.load(copy.deepcopy(base), tmp_path, trainable=True)
    theirs.train(), ours.train()
    x = torch.randn(3, 5, 16)
    torch.manual_seed(5)
    want = theirs(x)
    torch.manual_seed(5)
    got = ours(x)
    assert max_diff(got, want) <= 1e-5
    want.square().sum().backward()
    got.square().sum().backward()
    delta = wrapper(ours).deltas["default"]
    layer = theirs.base_model.model.layer
    pairs = [(delta.A, layer.lora_A["default"].weight), (delta.B, layer.lora_B["default"].weight),
             (delta.magnitude, layer.lora_magnitude_vector["default"].weight)]
    for mine, peft_param in pairs:
        assert mine.grad is not None and peft_param.grad is not None
        torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------- the magnitude per kind
# The invariants (identity, fp64 oracle, merge/unmerge, save/load, disabled, count, gradients,
# compositions, peft cross-load) run for DoRA on every kind in test_invariants.py.

DORA_KINDS = [pytest.param(KIND[name], dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
              for name in METHOD["dora"].kinds for dtype in DTYPES]


@pytest.mark.parametrize(("kind", "dtype"), DORA_KINDS)
def test_fresh_magnitude_is_the_row_norm_in_peft_shape(kind: Kind, dtype: torch.dtype) -> None:
    """m = ||W|| per output over every other axis of the canonical layout (peft's axis), kept in
    fp32, in peft's shape: ``(out,)``, or ``(1, out, 1, ...)`` for conv."""
    base = build(kind, dtype)
    model = adapted(METHOD["dora"], kind, dtype, random=False)
    m = delta_of(model).magnitude
    assert isinstance(delta_of(model), DoraDelta) and m.dtype == torch.float32
    assert m.shape == ((1, kind.out_features, *(1,) * len(kind.kernel)) if kind.kernel else (kind.out_features,))
    weight = canonical_weight(kind, base_module(base)).float()
    torch.testing.assert_close(m.flatten(), weight.flatten(1).norm(dim=1))


def test_bf16_peft_to_deltatune(tmp_path: Path) -> None:
    case = CASES[0]
    base, x = case.factory().to(torch.bfloat16), inputs(case)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                      **case.config))
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    theirs.eval().save_pretrained(tmp_path)
    want = output(theirs, x)
    got = output(dt.load(copy.deepcopy(base), tmp_path), x)
    assert max_diff(output(base, x), want) > 1e-1
    assert torch.allclose(got, want, **TOLERANCES[torch.bfloat16]), f"max abs diff {max_diff(got, want):.3g}"
