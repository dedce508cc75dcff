"""IA3: peft parity both ways, the invariant battery on every base kind IA3 supports, a dense
oracle, and the config rules.

Parity: peft -> deltatune and deltatune -> peft on tiny LLaMA, GPT-2 (Conv1D), BERT (SEQ_CLS)
and the ConvNet (Conv2d + Linear), with perturbed ``ia3_l`` vectors, within 1e-5 in fp32; the
adapter_config.json key set and the safetensors keys and shapes equal peft's.
Battery (fp32 and bf16, output and feed-forward scaling): init is the identity, a dense fp64
oracle ``diag(l) W`` / ``W diag(l)`` matches, merged == unmerged, unmerge restores weights and
biases, save -> load is identical, disabled == base, the trainable count is ``out`` (or ``in``)
per layer, and gradients reach only ``ia3_l``. peft is only imported here, as a test oracle.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from conftest import TOLERANCES, close, conv_net, perturb, state_hash, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from deltatune.layer import DeltaLayer
from test_battery import Single

import peft
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FP32_ATOL = TOLERANCES[torch.float32]["atol"]
DTYPES = [torch.float32, torch.bfloat16]

# ------------------------------------------------------------------------------------ peft parity

PARITY = [
    pytest.param(tiny_llama, {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                 id="llama"),
    pytest.param(tiny_llama, {"target_modules": r".*\.(k_proj|v_proj|down_proj)", "feedforward_modules": r".*down_proj"},
                 id="llama-regex"),
    pytest.param(tiny_gpt2, {"target_modules": ["c_attn", "c_fc", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
                 id="gpt2"),
    pytest.param(tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"],
                             "modules_to_save": ["ln_f"]}, id="gpt2-ff-c_fc-to-save"),
    pytest.param(tiny_bert, {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"],
                             "task_type": "SEQ_CLS"}, id="bert-seq-cls"),
    pytest.param(conv_net, {"target_modules": ["conv2", "pointwise", "head"], "feedforward_modules": ["pointwise"]},
                 id="convnet"),
]


def inputs_for(factory: Callable[[], nn.Module]) -> Tensor:
    if factory is not conv_net:
        return token_ids()
    ids = token_ids(vocab=20)
    ids[:, 0] = 0
    return ids


def output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out).float()



def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_parity(got: Tensor, want: Tensor, base_out: Tensor) -> None:
    assert max_diff(base_out, want) > 1e-3, "the adapter does not change the output: the test would prove nothing"
    assert max_diff(got, want) <= FP32_ATOL, f"max abs diff {max_diff(got, want):.3g}"


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def config_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize(("factory", "kwargs"), PARITY)
def test_peft_parity_both_ways(factory: Callable[[], nn.Module], kwargs: dict[str, Any], tmp_path: Path) -> None:
    base, x = factory(), inputs_for(factory)
    base_out = output(base, x)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**copy.deepcopy(kwargs)))
    perturb(theirs)
    theirs.eval().save_pretrained(tmp_path / "peft")
    want = output(theirs, x)
    loaded = dt.load(copy.deepcopy(base), tmp_path / "peft")
    assert_parity(output(loaded, x), want, base_out)
    dt.save(loaded, tmp_path / "resaved")
    resaved, original = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("resaved", "peft"))
    assert resaved.keys() == original.keys() and all(torch.equal(resaved[k], original[k]) for k in resaved)
    assert all(".ia3_l" in k or ".modules_to_save." in k or "classifier" in k or "ln_f" in k for k in original)

    ours = dt.attach(copy.deepcopy(base), dt.IA3Config(**copy.deepcopy(kwargs)))
    perturb(ours, seed=1)
    dt.save(ours.eval(), tmp_path / "dt")
    mine = output(ours, x)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dt").eval()
    assert_parity(output(back, x), mine, base_out)

    ours_json, peft_json = config_json(tmp_path / "dt"), config_json(tmp_path / "peft")
    assert set(ours_json) == set(peft_json) - {"peft_version"}
    for key in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "task_type", "modules_to_save", "exclude_modules"):
        assert ours_json[key] == peft_json[key], key
    for key in ("target_modules", "feedforward_modules"):
        as_set = (lambda v: frozenset(v) if isinstance(v, list) else v)
        assert as_set(ours_json[key]) == as_set(peft_json[key]), key
    assert shapes(tmp_path / "dt") == shapes(tmp_path / "peft")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_peft_merge_matches(dtype: torch.dtype) -> None:
    """Merged weights and biases equal peft's merge_and_unload (bf16: both round once)."""
    base = tiny_gpt2().to(dtype)
    kwargs = {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    ours = dt.attach(copy.deepcopy(base), dt.IA3Config(**kwargs))
    perturb(theirs)
    with torch.no_grad():
        for (_, p), (_, q) in zip(sorted((n, p) for n, p in theirs.named_parameters() if p.requires_grad),
                                  sorted((n, p) for n, p in ours.named_parameters() if p.requires_grad)):
            q.copy_(p)
    merged = theirs.merge_and_unload().state_dict()
    mine = dt.unload(ours, merge=True).state_dict()
    assert merged.keys() == mine.keys()
    assert all(torch.equal(merged[k], mine[k]) for k in merged), [k for k in merged if not torch.equal(merged[k], mine[k])]


def test_peft_bf16_to_deltatune(tmp_path: Path) -> None:
    base, x = tiny_llama().to(torch.bfloat16), token_ids()
    kwargs = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    perturb(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = dt.load(copy.deepcopy(base), tmp_path)
    assert torch.equal(output(ours, x), output(theirs, x))


# ------------------------------------------------------------------------------------- the battery

@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    channels: tuple[int, int]
    """(in, out) features or channels."""
    transposed: bool = False
    """Whether the stored weight is ``(in, out)`` (GPT-2 Conv1D)."""


KINDS = [
    Kind("linear", lambda: nn.Linear(16, 12), (3, 5, 16), (16, 12)),
    Kind("gpt2_conv1d", lambda: Conv1D(nf=12, nx=16), (3, 5, 16), (16, 12), transposed=True),
    Kind("conv2d", lambda: nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1), (2, 3, 9, 9), (3, 8)),
    Kind("conv2d_1x1", lambda: nn.Conv2d(6, 8, kernel_size=1), (2, 6, 5, 5), (6, 8)),
    Kind("conv3d", lambda: nn.Conv3d(3, 4, kernel_size=2, padding=1), (2, 3, 4, 5, 5), (3, 4)),
]
CASES = [pytest.param(k, ff, d, id=f"{k.name}-{'ff' if ff else 'out'}-{str(d).removeprefix('torch.')}")
         for k in KINDS for ff in (False, True) for d in DTYPES]


def build(kind: Kind, dtype: torch.dtype) -> Single:
    torch.manual_seed(0)
    layer = kind.make()
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D starts with a zero bias, which would hide bias scaling
    return Single(layer).to(dtype).eval()


def make_input(kind: Kind, dtype: torch.dtype) -> Tensor:
    return torch.randn(kind.shape, generator=torch.Generator().manual_seed(7)).to(dtype)


def adapted(kind: Kind, ff: bool, dtype: torch.dtype, init: bool = False) -> Single:
    model = build(kind, dtype)
    return dt.attach(model, dt.IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if ff else [],
                                         init_ia3_weights=init))


def vector(model: Single) -> nn.Parameter:
    assert isinstance(model.layer, DeltaLayer)
    return model.layer.deltas["default"].ia3_l


def base_of(model: Single) -> nn.Module:
    return model.layer.base_layer if isinstance(model.layer, DeltaLayer) else model.layer


@torch.no_grad()
def run(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def assert_close(a: Tensor, b: Tensor, dtype: torch.dtype, what: str) -> None:
    assert close(a, b, dtype), f"{what}: max abs error {max_diff(a, b):.3g} exceeds {TOLERANCES[dtype]}"


@pytest.mark.parametrize(("kind", "ff", "dtype"), CASES)
def test_init_is_identity_and_shapes(kind: Kind, ff: bool, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, ff, dtype, init=True)
    assert torch.equal(run(model, x), run(build(kind, dtype), x))
    layer, l = base_of(model), vector(model)
    channels = kind.channels[0] if ff else kind.channels[1]
    if kind.name.startswith("conv"):
        assert l.shape == (1, channels, *(1,) * (layer.weight.dim() - 2))
    else:
        assert l.shape == ((1, channels) if ff else (channels, 1))
    assert l.dtype == torch.float32 and torch.equal(l, torch.ones_like(l))
    assert dt.trainable_parameters(model) == (channels, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize(("kind", "ff", "dtype"), CASES)
def test_matches_dense_oracle(kind: Kind, ff: bool, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, ff, dtype)
    l = vector(model).detach().double().flatten()
    oracle = copy.deepcopy(build(kind, dtype).layer).double()
    w = oracle.weight.detach()
    canonical = w.t() if kind.transposed else w
    along = (1, -1) if ff else (-1, 1)
    scaled = canonical * l.reshape(*along, *(1,) * (canonical.dim() - 2))
    with torch.no_grad():
        oracle.weight.copy_(scaled.t() if kind.transposed else scaled)
        if not ff:
            oracle.bias.mul_(l)
    out = run(model, x)
    assert out.dtype == dtype
    assert not close(out, run(build(kind, dtype), x), dtype)
    assert_close(out, oracle(x.double()), dtype, "adapted output vs dense fp64 oracle")


@pytest.mark.parametrize(("kind", "ff", "dtype"), CASES)
def test_merge_unmerge(kind: Kind, ff: bool, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, ff, dtype)
    layer = base_of(model)
    weight, bias = layer.weight, layer.bias
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    unmerged = run(model, x)
    dt.merge(model)
    assert_close(run(model, x), unmerged, dtype, "merged vs unmerged")
    w1, b1 = weight.detach().clone(), bias.detach().clone()
    assert not torch.equal(w1, w0)
    assert torch.equal(b1, b0) == ff, "only output scaling changes the bias"
    dt.unmerge(model)
    assert base_of(model).weight is weight and base_of(model).bias is bias
    l = vector(model).detach().abs().flatten()
    checks = [(weight, w0, w1, _channel_view(l, kind, ff, weight))]
    if ff:
        assert torch.equal(bias, b0)
    else:
        checks.append((bias, b0, b1, l))
    for now, before, merged, along in checks:
        err = (now.float() - before.float()).abs()
        if dtype == torch.float32:
            assert (err <= 1e-6 * before.abs() + 1e-7).all(), err.max()
        else:  # one bf16 rounding of W*l (divided by |l| on the way back), then one of W
            assert (err <= 0.5 * _ulp(merged) / along + 0.5 * _ulp(before)).all()
    if dtype == torch.float32:
        assert_close(run(model, x), unmerged, dtype, "output after unmerge")


def _ulp(t: Tensor) -> Tensor:
    """The spacing of bf16 numbers at ``|t|``."""
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(1e-30))) - 7)


def _channel_view(l: Tensor, kind: Kind, ff: bool, stored: Tensor) -> Tensor:
    """``|l|`` broadcast over a stored weight along the axis it scales."""
    axis = (0 if kind.transposed else 1) if ff else (1 if kind.transposed else 0)
    shape = [1] * stored.dim()
    shape[axis] = -1
    return l.reshape(shape)


@pytest.mark.parametrize(("kind", "ff", "dtype"), CASES)
def test_save_load_and_disabled(kind: Kind, ff: bool, dtype: torch.dtype, tmp_path: Path) -> None:
    x = make_input(kind, dtype)
    base_out = run(build(kind, dtype), x)
    model = adapted(kind, ff, dtype)
    out = run(model, x)
    dt.save(model, tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"base_model.model.layer.ia3_l"}
    fresh = dt.load(build(kind, dtype), tmp_path)
    assert torch.equal(run(fresh, x), out) and torch.equal(vector(fresh), vector(model))
    with dt.disabled(model):
        assert torch.equal(run(model, x), base_out)
    assert torch.equal(run(model, x), out)


@pytest.mark.parametrize(("kind", "ff", "dtype"), CASES)
def test_backward_reaches_only_ia3(kind: Kind, ff: bool, dtype: torch.dtype) -> None:
    model = adapted(kind, ff, dtype).train()
    model(make_input(kind, dtype)).float().square().mean().backward()
    l = vector(model)
    for name, param in model.named_parameters():
        if param is l:
            assert param.grad is not None and param.grad.dtype == torch.float32 and param.grad.abs().sum() > 0
        else:
            assert not param.requires_grad and param.grad is None, name


def test_trainable_count_formula_on_llama() -> None:
    model = dt.attach(tiny_llama(), dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]))
    layers = 2
    expected = layers * (16 + 16 + 64)  # k and v: out (2 kv heads x 8); down_proj: in (intermediate)
    assert dt.trainable_parameters(model)[0] == expected


# ---------------------------------------------------------------------------------- config rules

def test_config_json_keys_and_round_trip() -> None:
    config = dt.IA3Config(target_modules=["v", "k", "k"], feedforward_modules=["k"])
    data = config.to_peft_dict()
    theirs = peft.IA3Config(target_modules=["v", "k"], feedforward_modules=["k"]).to_dict()
    assert set(data) | {"auto_mapping", "peft_version"} == set(theirs)
    assert data["target_modules"] == ["k", "v"] and data["peft_type"] == "IA3"
    assert dt.IA3Config.from_peft_dict(data) == config


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"target_modules": ["k", "v"], "feedforward_modules": ["w0"]}, "feedforward_modules"),
    ({"target_modules": None, "feedforward_modules": []}, "target_modules"),
    ({"target_modules": ["k"]}, "feedforward_modules"),
    ({"target_modules": ["k"], "feedforward_modules": [], "init_ia3_weights": "ones"}, "init_ia3_weights"),
    ({"target_modules": ["k"], "feedforward_modules": [], "fan_in_fan_out": 1}, "fan_in_fan_out"),
    ({"target_modules": ["k"], "feedforward_modules": "(", }, "feedforward_modules"),
    ({"target_modules": ["k"], "feedforward_modules": [""]}, "feedforward_modules"),
    ({"target_modules": ["k"], "feedforward_modules": [], "layers_to_transform": [0]}, "layers_to_transform"),
])
def test_config_errors_name_field_value_and_fix(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(dt.ConfigError) as info:
        dt.IA3Config(**kwargs)
    message = str(info.value)
    assert field in message and "fix" in message.lower()


def test_regex_targets_skip_subset_rule_and_no_condensing() -> None:
    dt.IA3Config(target_modules=r".*k", feedforward_modules=["anything"])
    model = tiny_llama()
    names = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n})
    dt.attach(model, dt.IA3Config(target_modules=names, feedforward_modules=[n for n in names if "down" in n]))
    assert list(model.deltatune_state.configs["default"].target_modules) == names


@pytest.mark.parametrize("target", ["embed", "conv1"])
def test_unsupported_layers_raise_and_leave_model_unchanged(target: str) -> None:
    model = conv_net()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="Conv2d and Conv3d"):
        dt.attach(model, dt.IA3Config(target_modules=[target, "head"], feedforward_modules=[]))
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")
