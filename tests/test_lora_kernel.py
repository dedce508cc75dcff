"""The fused base + LoRA autograd function: gradcheck in fp64, and the layer path it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.methods import lora_kernel


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)])
def test_gradcheck_all_inputs(with_bias: bool, shape: tuple[int, ...]) -> None:
    """Every gradient (x, W, b, A, B) agrees with finite differences in fp64."""
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).requires_grad_()

    x, weight, a, b = rand(*shape), rand(4, 7), rand(3, 7), rand(4, 3)
    bias = rand(4) if with_bias else None
    assert torch.autograd.gradcheck(lora_kernel.LoraLinear.apply, (x, weight, bias, a, b, 0.7))


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
              b: torch.Tensor, s: float) -> torch.Tensor:
    """The naive dense formula: x (W + s B A)ᵀ + b."""
    return F.linear(x, weight + s * b @ a, bias)


@pytest.mark.parametrize("scaling", [0.25, 1.0, 2.0, 4.0, 2 / 3, 1.7])
@pytest.mark.parametrize("dims", [(1024, 512, 1408, 16), (1024, 1408, 512, 16), (7, 33, 65, 4),
                                  (3, 512, 512, 1), (256, 96, 80, 64)])
def test_forward_rounds_as_peft_for_every_scale(scaling: float, dims: tuple[int, int, int, int]) -> None:
    """fp32 outputs equal peft's ``F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s`` bit for
    bit for every scale: the kernel runs the same operations in the same order, so the equality
    holds whatever order a BLAS library accumulates a product in (on any CPU or thread count)."""
    tokens, fan_in, fan_out, rank = dims
    gen = torch.Generator().manual_seed(rank)
    x, weight, bias = (torch.randn(tokens, fan_in, generator=gen), torch.randn(fan_out, fan_in, generator=gen),
                       torch.randn(fan_out, generator=gen))
    a, b = torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen)
    peft_order = F.linear(x, weight, bias) + F.linear(F.linear(x, a), b) * scaling
    assert torch.equal(lora_kernel.LoraLinear.apply(x, weight, bias, a, b, scaling), peft_order)


def test_matches_dense_reference_and_skips_unneeded_grads() -> None:
    """fp32 values and gradients equal the dense formula's; frozen W gets no gradient computed."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, requires_grad=True)
    weight, bias = torch.randn(8, 16), torch.randn(8)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    got = lora_kernel.LoraLinear.apply(x, weight, bias, a, b, 2.0)
    want = reference(x, weight, bias, a, b, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    seed = torch.randn_like(want)
    grads = torch.autograd.grad(got, (x, a, b), seed)
    want_grads = torch.autograd.grad(want, (x, a, b), seed)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def lora_model(fan_in_fan_out: bool) -> nn.Module:
    """Two stacked linear layers (or GPT-2 Conv1D ones) with biases."""
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(Conv1D(12, 10), nn.Tanh(), Conv1D(6, 12))
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_layer_takes_fused_path_with_same_result(use_dora: bool, fan_in_fan_out: bool, bias: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An attached layer gives the same output and gradients through the fused function as
    through the generic delta path (forced by turning the fused path off). LoRA's output is
    bit-identical; DoRA's generic path rounds ``g * (y - b) + b`` differently."""
    torch.manual_seed(1)
    model = lora_model(fan_in_fan_out)
    dt.attach(model, dt.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], bias=bias,
                                   init_lora_weights=False, use_dora=use_dora))
    with torch.no_grad():  # a magnitude away from the norm: g = m / ||W + sBA|| != 1
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view(p.shape))
    x = torch.randn(4, 5, 10, requires_grad=True)
    calls: list[int] = []
    function = lora_kernel.DoraLinear if use_dora else lora_kernel.LoraLinear
    original = function.apply

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(function, "apply", counted)
    fused = run_and_grads(model, x)
    assert len(calls) == 2, "both adapted layers should take the fused path"
    monkeypatch.setattr(lora_kernel, "applies", lambda *args: False)
    generic = run_and_grads(model, x)
    assert len(calls) == 2
    expected = 6 + (2 if bias == "all" else 0) + (2 if use_dora else 0)
    assert fused.keys() == generic.keys() and len(fused) == expected
    if not use_dora:
        assert torch.equal(fused["out"], generic["out"]), "forward rounds as the generic path (and peft) does"
    for name in fused:
        torch.testing.assert_close(fused[name], generic[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lora_alpha", [6, 5])  # s = 2 (accumulated into the fp32 sum) and 5/3
def test_fp32_adapter_on_half_base_takes_fused_path(base_dtype: torch.dtype, lora_alpha: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-bit base with an fp32 adapter (the default for half-precision models) goes through
    the fused function: the output equals the generic path's (and so peft's) bit for bit, the
    input gradient stays in the base dtype, adapter gradients in fp32 agree closely."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6)).to(base_dtype)
    dt.attach(model, dt.LoraConfig(r=3, lora_alpha=lora_alpha, target_modules=["0", "2"],
                                   init_lora_weights=False))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora" in n)
    x = torch.randn(4, 5, 10).to(base_dtype).requires_grad_()
    calls: list[int] = []
    original = lora_kernel.LoraLinear.apply

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lora_kernel.LoraLinear, "apply", counted)
    fused = run_and_grads(model, x)
    assert len(calls) == 2
    monkeypatch.setattr(lora_kernel, "applies", lambda *args: False)
    generic = run_and_grads(model, x)
    assert fused["out"].dtype == base_dtype and fused["x.grad"].dtype == base_dtype
    assert torch.equal(fused["out"], generic["out"])
    eps = torch.finfo(base_dtype).eps  # one rounding step: the adapter's share may round the other way
    torch.testing.assert_close(fused["x.grad"], generic["x.grad"], rtol=eps, atol=eps)
    for name in fused:
        if name not in ("out", "x.grad"):
            torch.testing.assert_close(fused[name], generic[name], rtol=1e-4, atol=1e-5, msg=name)


def test_siblings_sharing_an_input_match_the_generic_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two bf16 layers with fp32 adapters reading the same input (as q/k/v do): outputs and
    adapter gradients equal the generic path's; the input gradient sums four bf16 contributions
    in another order, so it may differ by a rounding step."""

    class Siblings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(8, 6), nn.Linear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(x) * self.k(x)

    torch.manual_seed(5)
    model = Siblings().bfloat16()
    dt.attach(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k"], init_lora_weights=False))
    x = torch.randn(3, 4, 8).bfloat16().requires_grad_()
    fused = run_and_grads(model, x)
    monkeypatch.setattr(lora_kernel, "applies", lambda *args: False)
    generic = run_and_grads(model, x)
    assert fused.keys() == generic.keys() and len(fused) == 6
    for name in fused:
        if name != "x.grad":
            assert torch.equal(fused[name], generic[name]), name
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(fused["x.grad"], generic["x.grad"], rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("with_bias", [True, False])
def test_dora_gradcheck_all_inputs(with_bias: bool) -> None:
    """Every gradient of the fused DoRA function (x, W, b, A, B, magnitude) agrees with finite
    differences in fp64, the norm held constant."""
    gen = torch.Generator().manual_seed(4)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).requires_grad_()

    x, weight, a, b, magnitude = rand(2, 3, 7), rand(4, 7), rand(3, 7), rand(4, 3), rand(4)
    bias = rand(4) if with_bias else None
    norm = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lora_kernel.DoraLinear.apply, (x, weight, bias, a, b, magnitude, norm, 0.7))


def run_and_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output, the input gradient and every trainable parameter's gradient."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    out = model(x)
    out.pow(2).sum().backward()
    assert x.grad is not None
    found = {"out": out.detach(), "x.grad": x.grad.clone()}
    found.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return found


def test_generic_path_when_dropout_is_active_or_dtypes_differ() -> None:
    """Dropout in training and a bf16 input on an fp32 layer are left to the generic path."""
    torch.manual_seed(2)
    layer = nn.Sequential(nn.Linear(8, 8))
    dt.attach(layer, dt.LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5))
    delta = next(m for m in layer.modules() if isinstance(m, dt.methods.lora.LoraDelta))
    x = torch.randn(3, 8)
    assert dt.methods.lora_fused.fused_lora(delta, x) is None  # training with dropout
    layer.eval()
    assert dt.methods.lora_fused.fused_lora(delta, x) is not None
    assert dt.methods.lora_fused.fused_lora(delta, x.bfloat16()) is None
