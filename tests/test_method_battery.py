"""The invariant battery (DESIGN principle 9), parametrized by method: VeRA, AdaLoRA and BitFit on
every base kind each supports, in fp32 and bf16.

A ``Spec`` says how to attach a method to the one-layer model of test_battery, its dense fp64
oracle (the untouched base layer with the weight and bias the method promises) and its
parameter-count formula; every check below runs for every (spec, kind, dtype):

1. the default init is exactly the identity;
2. with random trained tensors the output matches the dense fp64 oracle;
3. merged output == unmerged output;
4. unmerge restores the weights (fp32: 1e-6; bf16: half an ulp of max(|W|, |W merged|));
5. save -> load into a fresh base gives identical outputs, and the loaded adapter is frozen;
6. ``dt.disabled`` gives the base output exactly (also while merged, fp32);
7. trainable parameters == the formula (and ``dt.adapter_parameters``);
8. a backward pass reaches exactly the adapter's trained tensors.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from conftest import close
from deltatune.layer import DeltaLayer
from deltatune.state import state_of
from test_battery import KINDS, Kind, Single, assert_close, assert_restored, build, make_input, run, stored_weight

DTYPES = [torch.float32, torch.bfloat16]
R = 4
ALPHA = 8.0

LAYERNORM = Kind("layernorm", lambda: nn.LayerNorm(12), lambda g: torch.randn(3, 5, 12, generator=g),
                 lambda w: w, lambda w: w, 12, 12)
"""Not an adaptable layer, but it has a bias: BitFit trains it."""


def _delta(model: nn.Module) -> Any:
    assert isinstance(model.layer, DeltaLayer)
    return model.layer.deltas["default"]


def _f64(t: Tensor) -> Tensor:
    return t.detach().double()


def vera_oracle(model: nn.Module, kind: Kind, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    delta = _delta(model)
    a = _f64(delta.projection.vera_A)[:, : kind.in_features]
    bb = _f64(delta.projection.vera_B)[: kind.out_features]
    return w + (_f64(delta.vera_lambda_b)[:, None] * bb) @ (_f64(delta.vera_lambda_d)[:, None] * a), b


def adalora_oracle(model: nn.Module, kind: Kind, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    delta = _delta(model)
    product = _f64(delta.lora_B) @ (_f64(delta.lora_A) * _f64(delta.lora_E))
    # ranknum is stored in fp32 as peft does: init_r + 1e-5 rounded to fp32
    return w + (ALPHA / float(torch.tensor(R + 1e-5, dtype=torch.float32)) * product).view(w.shape), b


def bitfit_oracle(model: nn.Module, kind: Kind, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    (bias,) = state_of(model).model_deltas["default"].biases
    return w, _f64(bias)


@dataclass(frozen=True)
class Spec:
    name: str
    config: Callable[[], dt.DeltaConfig]
    kinds: list[Kind]
    oracle: Callable[[nn.Module, Kind, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
    """(adapted model, kind, canonical fp64 W, fp64 bias) -> the (W, bias) the method promises."""
    count: Callable[[Kind], int]
    trained: Callable[[nn.Module], list[nn.Parameter]]


def _by_name(*names: str) -> list[Kind]:
    return [k for k in KINDS if k.name in names]


def _layer_params(model: nn.Module) -> list[nn.Parameter]:
    return list(_delta(model).parameters())


SPECS = [
    Spec("vera", lambda: dt.VeraConfig(r=R, target_modules=["layer"]), _by_name("linear", "gpt2_conv1d"),
         vera_oracle, lambda k: R + k.out_features, _layer_params),
    Spec("adalora", lambda: dt.AdaLoraConfig(init_r=R, target_r=2, lora_alpha=ALPHA, target_modules=["layer"],
                                             total_step=10),
         _by_name("linear", "gpt2_conv1d", "conv2d", "conv2d_1x1"), adalora_oracle,
         lambda k: R * (k.in_features * math.prod(k.kernel) + k.out_features + 1), _layer_params),
    Spec("bitfit", lambda: dt.BitFitConfig(target_modules=["layer"]),
         [*_by_name("linear", "gpt2_conv1d", "conv1d", "conv2d", "conv2d_1x1"), LAYERNORM], bitfit_oracle,
         lambda k: k.out_features, lambda m: list(state_of(m).model_deltas["default"].parameters())),
]
CASES = [pytest.param(s, k, d, id=f"{s.name}-{k.name}-{str(d).removeprefix('torch.')}")
         for s in SPECS for k in s.kinds for d in DTYPES]


def attached(spec: Spec, kind: Kind, dtype: torch.dtype, random: bool = True) -> Single:
    """The base with the method attached; by default every trained tensor is random (not the identity)."""
    model = dt.attach(build(kind, dtype), spec.config())
    if random:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in spec.trained(model):
                param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param))
    return model


def _module(model: nn.Module) -> nn.Module:
    return model.layer.base_layer if isinstance(model.layer, DeltaLayer) else model.layer


# ------------------------------------------------------------------------------------------ checks

@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_init_is_identity(spec: Spec, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    out = run(attached(spec, kind, dtype, random=False), x)
    assert out.dtype == dtype and torch.equal(out, run(build(kind, dtype), x))


@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_matches_dense_oracle(spec: Spec, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = attached(spec, kind, dtype)
    oracle = copy.deepcopy(build(kind, dtype).layer).double()
    bias = getattr(oracle, "bias", None)
    weight, new_bias = spec.oracle(model, kind, kind.to_canonical(_f64(oracle.weight)),
                                   None if bias is None else _f64(bias))
    with torch.no_grad():
        oracle.weight.copy_(kind.from_canonical(weight))
        if new_bias is not None:
            oracle.bias.copy_(new_bias)
    out = run(model, x)
    assert out.dtype == dtype
    assert not close(out, run(build(kind, dtype), x), dtype), "the adapter should change the output"
    assert_close(out, oracle(x.double()), dtype, f"{spec.name} output vs dense fp64 oracle")


@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_merged_equals_unmerged(spec: Spec, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = attached(spec, kind, dtype)
    unmerged = run(model, x)
    dt.merge(model)
    assert_close(run(model, x), unmerged, dtype, "merged vs unmerged output")


@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_unmerge_restores_weights(spec: Spec, kind: Kind, dtype: torch.dtype) -> None:
    model = attached(spec, kind, dtype)
    weight = _module(model).weight
    original = weight.detach().clone()
    dt.merge(model)
    merged = weight.detach().clone()
    dt.unmerge(model)
    assert _module(model).weight is weight
    assert_restored(weight.detach(), original, merged, dtype)


@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_save_load_roundtrip(spec: Spec, kind: Kind, dtype: torch.dtype, tmp_path: Path) -> None:
    x = make_input(kind, dtype)
    model = attached(spec, kind, dtype)
    dt.save(model, tmp_path)
    fresh = dt.load(build(kind, dtype), tmp_path)
    assert torch.equal(run(fresh, x), run(model, x))
    assert all(torch.equal(a, b) for a, b in zip(spec.trained(fresh), spec.trained(model)))
    assert not any(p.requires_grad for p in fresh.parameters()), "dt.load freezes the adapter by default"


@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_disabled_gives_base_output(spec: Spec, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    base_out = run(build(kind, dtype), x)
    model = attached(spec, kind, dtype)
    adapted_out = run(model, x)
    with dt.disabled(model):
        assert torch.equal(run(model, x), base_out)
    assert torch.equal(run(model, x), adapted_out)
    dt.merge(model)
    with dt.disabled(model):
        if dtype == torch.float32:  # bf16: the unmerged weight is the base up to rounding
            assert_close(run(model, x), base_out, dtype, "disabled while merged vs base output")
    assert_close(run(model, x), adapted_out, dtype, "merged output after the block")


@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_trainable_count_matches_formula(spec: Spec, kind: Kind, dtype: torch.dtype) -> None:
    base_total = sum(p.numel() for p in build(kind, dtype).parameters())
    model = attached(spec, kind, dtype, random=False)
    expected = spec.count(kind)
    trainable, total = dt.trainable_parameters(model)
    assert trainable == expected == dt.adapter_parameters(model, "default")
    # BitFit's copy replaces the bias it trains; the other methods add their tensors
    assert total == base_total + (0 if spec.name == "bitfit" else expected)


@pytest.mark.parametrize(("spec", "kind", "dtype"), CASES)
def test_backward_reaches_only_adapter(spec: Spec, kind: Kind, dtype: torch.dtype) -> None:
    model = attached(spec, kind, dtype)
    model.train()
    model(make_input(kind, dtype)).float().square().mean().backward()
    trained = {id(p) for p in spec.trained(model)}
    assert trained
    for name, param in model.named_parameters():
        if id(param) in trained:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert stored_weight(model).grad is None
