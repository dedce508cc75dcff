"""DoRA (``LoraConfig(use_dora=True)``): peft parity both ways and the invariant battery.

Parity: peft's DoRA adapters (random A, B and magnitude) load into deltatune and give peft's
outputs within 1e-5 in fp32, and deltatune's load into peft the same way, on tiny LLaMA,
GPT-2 (Conv1D and the tied embedding), BERT (SEQ_CLS) and a net of Embedding / Conv1d / Conv2d /
Conv3d / Linear layers; config keys and safetensors keys / shapes equal peft's. Also: training
mode with dropout matches peft on the same dropout mask.

Battery per base kind, fp32 and bf16: identity at init, a dense fp64 oracle
``m * (W + s B A) / ||W + s B A||``, merged == unmerged, unmerge restores the weight,
save -> load identical, disabled == base, trainable count ``r * (in * prod(k) + out) + out``,
gradients reach only A, B and m.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import TOLERANCES, conv_net, tiny_bert, tiny_gpt2, tiny_llama
from deltatune.io import adapter_tensors
from deltatune.methods.dora import DoraDelta
from test_battery import ALPHA, DTYPES, KINDS, R, Kind, Single, assert_close, bf16_ulp, build, make_input, run, \
    stored_weight, wrapper
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


# ------------------------------------------------------------------------------------ the battery

DORA_KINDS = [*KINDS, Kind("conv3d", lambda: nn.Conv3d(2, 4, kernel_size=(1, 3, 2), padding=1),
                           lambda g: torch.randn(2, 2, 3, 5, 4, generator=g), lambda w: w, lambda w: w, 2, 4,
                           (1, 3, 2))]
BATTERY = [pytest.param(kind, dtype, id=f"{kind.name}-{str(dtype).removeprefix('torch.')}")
           for kind in DORA_KINDS for dtype in DTYPES]


def adapted(kind: Kind, dtype: torch.dtype, init: bool | str = False, perturb: bool = True, **changes: Any) -> Single:
    """The one-layer model with DoRA attached; by default A, B and m are all random (so g != 1)."""
    model = build(kind, dtype)
    dt.attach(model, dt.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["layer"], init_lora_weights=init,
                                   use_dora=True, **changes))
    if perturb:
        with torch.no_grad():
            m = delta_of(model).magnitude
            m.mul_(1 + 0.5 * torch.rand(m.shape, generator=torch.Generator().manual_seed(3)))
    return model


def delta_of(model: Single) -> DoraDelta:
    delta = wrapper(model).deltas["default"]
    assert isinstance(delta, DoraDelta)
    return delta


def canonical_norm(w: Tensor) -> Tensor:
    return w.flatten(1).norm(dim=1)


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_init_is_identity(kind: Kind, dtype: torch.dtype, init: bool | str) -> None:
    x = make_input(kind, dtype)
    base = build(kind, dtype)
    model = adapted(kind, dtype, init, perturb=False)
    out = run(model, x)
    assert out.dtype == dtype and torch.equal(out, run(base, x))
    m = delta_of(model).magnitude
    assert m.shape == ((1, kind.out_features, *(1,) * len(kind.kernel)) if kind.kernel else (kind.out_features,))
    # peft's axis: one norm per output over every other axis of the canonical layout
    torch.testing.assert_close(m.flatten(), canonical_norm(kind.to_canonical(base.layer.weight.float())))


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_matches_dense_oracle(kind: Kind, dtype: torch.dtype, rslora: bool) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, dtype, use_rslora=rslora)
    delta = delta_of(model)
    scale = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    oracle = copy.deepcopy(build(kind, dtype).layer).double()
    canonical = kind.to_canonical(oracle.weight.detach())
    product = (delta.B.detach().double().flatten(1) @ delta.A.detach().double().flatten(1)).view(canonical.shape)
    direction = canonical + scale * product
    m = delta.magnitude.detach().double().flatten()
    merged = (m / canonical_norm(direction)).view(-1, *(1,) * (direction.dim() - 1)) * direction
    with torch.no_grad():
        oracle.weight.copy_(kind.from_canonical(merged))
    expected = oracle(x.double() if x.is_floating_point() else x)
    out = run(model, x)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "DoRA output vs dense fp64 oracle")


@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_merged_equals_unmerged(kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, dtype)
    unmerged = run(model, x)
    dt.merge(model)
    assert wrapper(model).merged == ["default"]
    assert_close(run(model, x), unmerged, dtype, "merged vs unmerged output")


@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_unmerge_restores_weights(kind: Kind, dtype: torch.dtype) -> None:
    """fp32: within 1e-6 + 1e-6 |W| (the division by m / ||W + dW|| scales rounding errors with W).
    bf16: merge rounds W' once (at most 2^-8 |W'| relative), unmerge divides that error by the
    factor m / ||W + dW|| (giving at most 2^-8 |W + dW|) and rounds again (half an ulp at |W|)."""
    x = make_input(kind, dtype)
    model = adapted(kind, dtype)
    weight = stored_weight(model)
    original = weight.detach().clone()
    out = run(model, x)
    dt.merge(model)
    assert not torch.equal(weight, original)
    dt.unmerge(model)
    assert stored_weight(model) is weight and wrapper(model).merged == []
    if dtype == torch.float32:
        torch.testing.assert_close(weight.detach(), original, atol=1e-6, rtol=1e-6)
        assert_close(run(model, x), out, dtype, "output after unmerge")
        return
    delta = delta_of(model)
    full = kind.to_canonical(original.float()) + delta.low_rank_weight().detach()
    bound = 0.5 * bf16_ulp(original) + kind.from_canonical(full.abs() * 2.0 ** -8) * 1.01
    err = (weight.detach().float() - original.float()).abs()
    assert (err <= bound).all(), f"unmerge error up to {(err / bound).max().item():.3g} x the bound"


@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_save_load_roundtrip(kind: Kind, dtype: torch.dtype, tmp_path: Path) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, dtype)
    dt.save(model, tmp_path)
    assert "base_model.model.layer.lora_magnitude_vector" in load_file(tmp_path / "adapter_model.safetensors")
    fresh = dt.load(build(kind, dtype), tmp_path)
    assert torch.equal(run(fresh, x), run(model, x))
    assert torch.equal(delta_of(fresh).magnitude, delta_of(model).magnitude)
    assert not any(p.requires_grad for p in fresh.parameters())


@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_disabled_gives_base_output(kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    base_out = run(build(kind, dtype), x)
    model = adapted(kind, dtype)
    adapted_out = run(model, x)
    with dt.disabled(model):
        assert torch.equal(run(model, x), base_out)
    assert torch.equal(run(model, x), adapted_out)
    dt.merge(model)
    merged_out = run(model, x)
    with dt.disabled(model):
        assert wrapper(model).merged == []
        if dtype == torch.float32:  # bf16: the unmerged weight is the base up to rounding (see above)
            assert_close(run(model, x), base_out, dtype, "disabled while merged vs base output")
    assert wrapper(model).merged == ["default"]
    assert_close(run(model, x), merged_out, dtype, "merged output after the block")


@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_trainable_count_matches_formula(kind: Kind, dtype: torch.dtype) -> None:
    base_total = sum(p.numel() for p in build(kind, dtype).parameters())
    model = adapted(kind, dtype, init=True, perturb=False)
    expected = R * (kind.in_features * math.prod(kind.kernel) + kind.out_features) + kind.out_features
    assert dt.trainable_parameters(model) == (expected, base_total + expected)
    assert delta_of(model).magnitude.dtype == torch.float32


@pytest.mark.parametrize(("kind", "dtype"), BATTERY)
def test_backward_reaches_only_adapter(kind: Kind, dtype: torch.dtype) -> None:
    model = adapted(kind, dtype)
    model.train()
    model(make_input(kind, dtype)).float().square().mean().backward()
    delta = delta_of(model)
    adapter = {id(delta.A), id(delta.B), id(delta.magnitude)}
    for name, param in model.named_parameters():
        if id(param) in adapter:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
            assert param.grad.dtype == torch.float32
        else:
            assert not param.requires_grad and param.grad is None, name


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
