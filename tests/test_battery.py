"""The invariant battery (DESIGN principle 9) for LoRA on every base kind, in fp32 and bf16.

Every base kind is built as a one-layer model (``Single``, the layer under the name ``layer``)
by one shared table of builders; every test is parametrized over (kind, dtype). The checks:

1. zero-init (``init_lora_weights`` True and "gaussian") is exactly the identity;
2. non-zero adapters match a dense fp64 oracle ``W + s * B @ A`` (``s = alpha / r``, or
   ``alpha / sqrt(r)`` with rsLoRA), laid out per kind (Conv1D stores ``(in, out)``, an
   embedding table is ``(num, dim)``, a conv kernel is ``(out, in, *kernel)``);
3. merged output == unmerged output;
4. unmerge restores the weights: fp32 within 1e-6; bf16 within half a bf16 ulp of
   ``max(|W|, |W merged|)`` (see ``test_unmerge_restores_weights``);
5. save -> load into a fresh base gives identical outputs (``torch.equal``);
6. ``dt.disabled`` gives the base output, also while merged, and the merge comes back after;
7. trainable parameters == ``r * (in * prod(kernel) + out)``;
8. a backward pass reaches only the adapter parameters.

On a bf16 base the adapter parameters are kept in fp32 (peft's ``autocast_adapter_dtype``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from conftest import TOLERANCES, close
from deltatune.layer import DeltaLayer

R = 4
ALPHA = 8.0
DTYPES = [torch.float32, torch.bfloat16]


class Single(nn.Module):
    """A model made of one adaptable layer, so every output is that layer's output."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


@dataclass(frozen=True)
class Kind:
    """How to build one base kind and feed it, and how its weight maps to the canonical layout."""

    name: str
    make: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], Tensor]
    to_canonical: Callable[[Tensor], Tensor]
    """Stored weight -> canonical ``(out, in, *kernel)``; ``from_canonical`` is its inverse."""
    from_canonical: Callable[[Tensor], Tensor]
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()


def _identity(w: Tensor) -> Tensor:
    return w


def _transpose(w: Tensor) -> Tensor:
    return w.t()


def _ids(g: torch.Generator) -> Tensor:
    ids = torch.randint(0, 20, (3, 7), generator=g)
    ids[0, :2] = 0  # padding_idx rows are looked up too
    return ids


KINDS = [
    Kind("linear", lambda: nn.Linear(16, 12), lambda g: torch.randn(3, 5, 16, generator=g),
         _identity, _identity, 16, 12),
    Kind("gpt2_conv1d", lambda: Conv1D(nf=12, nx=16), lambda g: torch.randn(3, 5, 16, generator=g),
         _transpose, _transpose, 16, 12),
    Kind("embedding", lambda: nn.Embedding(20, 12, padding_idx=0), _ids, _transpose, _transpose, 20, 12),
    Kind("conv1d", lambda: nn.Conv1d(6, 8, kernel_size=3, padding=2, dilation=2),
         lambda g: torch.randn(2, 6, 11, generator=g), _identity, _identity, 6, 8, (3,)),
    Kind("conv2d", lambda: nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
         lambda g: torch.randn(2, 3, 9, 9, generator=g), _identity, _identity, 3, 8, (3, 3)),
    Kind("conv2d_1x1", lambda: nn.Conv2d(6, 8, kernel_size=1),
         lambda g: torch.randn(2, 6, 5, 5, generator=g), _identity, _identity, 6, 8, (1, 1)),
]

CASES = [pytest.param(kind, dtype, id=f"{kind.name}-{str(dtype).removeprefix('torch.')}")
         for kind in KINDS for dtype in DTYPES]


# ----------------------------------------------------------------------------------------- helpers

def build(kind: Kind, dtype: torch.dtype, seed: int = 0) -> Single:
    """The base model, the same for the same seed (so a "fresh base" equals the original)."""
    torch.manual_seed(seed)
    return Single(kind.make()).to(dtype).eval()


def make_input(kind: Kind, dtype: torch.dtype) -> Tensor:
    x = kind.make_input(torch.Generator().manual_seed(7))
    return x.to(dtype) if x.is_floating_point() else x


def config(init: bool | str = False, **changes: object) -> dt.LoraConfig:
    return dt.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["layer"], init_lora_weights=init, **changes)


def adapted(kind: Kind, dtype: torch.dtype, init: bool | str = False, **changes: object) -> Single:
    model = build(kind, dtype)
    dt.attach(model, config(init, **changes))
    return model


def wrapper(model: Single) -> DeltaLayer:
    assert isinstance(model.layer, DeltaLayer)
    return model.layer


def stored_weight(model: Single) -> Tensor:
    """The base layer's weight parameter, whether or not the layer is wrapped."""
    layer = model.layer.base_layer if isinstance(model.layer, DeltaLayer) else model.layer
    return layer.weight


@torch.no_grad()
def run(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def bf16_ulp(t: Tensor) -> Tensor:
    """The spacing of bf16 numbers at ``|t|`` (8 significand bits), elementwise."""
    mag = t.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_restored(restored: Tensor, original: Tensor, merged: Tensor, dtype: torch.dtype) -> None:
    """An unmerged weight is the original up to the rounding merge/unmerge cannot avoid.

    fp32: within 1e-6. bf16: merging rounds ``W + dW`` to bf16 once and unmerging rounds back,
    so the error is at most half a bf16 ulp at ``max(|W|, |W + dW|)``; the bound is reached
    (e.g. 0.03 on an N(0, 1) embedding table). Relative to ``|W|`` alone it can be many ulps,
    so the bf16 TOLERANCES row is not a valid bound on weights when ``|dW| >> |W|``.
    """
    if dtype == torch.float32:
        torch.testing.assert_close(restored, original, atol=1e-6, rtol=0)
        return
    err = (restored.float() - original.float()).abs()
    bound = 0.5 * bf16_ulp(torch.maximum(original.float().abs(), merged.float().abs()))
    assert (err <= bound).all(), f"unmerge error up to {(err / bound).max().item():.3g} x the half-ulp bound"


def with_weight(kind: Kind, dtype: torch.dtype, weight: Tensor) -> Single:
    """The base model with its weight parameter overwritten by ``weight``."""
    model = build(kind, dtype)
    with torch.no_grad():
        model.layer.weight.copy_(weight)
    return model


def assert_close(a: Tensor, b: Tensor, dtype: torch.dtype, what: str) -> None:
    err = (a.float() - b.float()).abs().max().item()
    assert close(a, b, dtype), f"{what}: max abs error {err:.3g} exceeds {TOLERANCES[dtype]}"


# ------------------------------------------------------------------------------------------ checks

@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_zero_init_is_identity(kind: Kind, dtype: torch.dtype, init: bool | str) -> None:
    x = make_input(kind, dtype)
    base_out = run(build(kind, dtype), x)
    model = adapted(kind, dtype, init)
    out = run(model, x)
    assert out.dtype == base_out.dtype
    assert torch.equal(out, base_out)
    delta = wrapper(model).deltas["default"]
    zero = delta.A if kind.name == "embedding" else delta.B  # peft: embeddings zero A, others zero B
    assert not zero.any() and (delta.B if kind.name == "embedding" else delta.A).any()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_matches_dense_oracle(kind: Kind, dtype: torch.dtype, rslora: bool) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, dtype, use_rslora=rslora)
    delta = wrapper(model).deltas["default"]
    scale = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    assert delta.scaling == pytest.approx(scale)
    assert delta.A.shape == (R, kind.in_features, *kind.kernel)
    assert delta.B.shape == (kind.out_features, R, *(1,) * len(kind.kernel))
    assert delta.A.any() and delta.B.any()

    # The oracle: the untouched base layer in fp64 with its weight replaced by W + s * B @ A.
    oracle = copy.deepcopy(build(kind, dtype).layer).double()
    canonical = kind.to_canonical(oracle.weight.detach())
    product = (delta.B.detach().double().flatten(1) @ delta.A.detach().double().flatten(1)).view(canonical.shape)
    with torch.no_grad():
        oracle.weight.copy_(kind.from_canonical(canonical + scale * product))
    expected = oracle(x.double() if x.is_floating_point() else x)
    out = run(model, x)
    assert out.dtype == dtype
    assert not close(out, run(build(kind, dtype), x), dtype), "the adapter should change the output"
    assert_close(out, expected, dtype, "adapted output vs dense fp64 oracle")


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_merged_equals_unmerged(kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, dtype)
    unmerged = run(model, x)
    dt.merge(model)
    assert wrapper(model).merged == ["default"]
    assert_close(run(model, x), unmerged, dtype, "merged vs unmerged output")
    dt.merge(model)  # merging twice is a no-op
    assert_close(run(model, x), unmerged, dtype, "merged twice vs unmerged output")


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_unmerge_restores_weights(kind: Kind, dtype: torch.dtype) -> None:
    """fp32: within 1e-6; bf16: within half a bf16 ulp of ``max(|W|, |W merged|)`` (assert_restored)."""
    x = make_input(kind, dtype)
    model = adapted(kind, dtype)
    weight = stored_weight(model)
    original = weight.detach().clone()
    dt.merge(model)
    merged_weight = weight.detach().clone()
    assert not torch.equal(merged_weight, original)
    dt.unmerge(model)
    assert wrapper(model).merged == []
    assert stored_weight(model) is weight, "the Parameter object must be kept (ties, optimizers)"
    assert_restored(weight.detach(), original, merged_weight, dtype)
    # unmerged, the model runs base + delta path again (on the restored weight)
    reference = with_weight(kind, dtype, weight.detach())
    dt.attach(reference, config())
    with torch.no_grad():
        for mine, theirs in zip(wrapper(reference).deltas.parameters(), wrapper(model).deltas.parameters()):
            mine.copy_(theirs)
    assert torch.equal(run(model, x), run(reference, x))
    if dtype == torch.float32:
        assert_close(run(model, x), run(adapted(kind, dtype), x), dtype, "output after unmerge")


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_save_load_roundtrip(kind: Kind, dtype: torch.dtype, tmp_path: Path) -> None:
    x = make_input(kind, dtype)
    model = adapted(kind, dtype)
    out = run(model, x)
    dt.save(model, tmp_path)
    fresh = dt.load(build(kind, dtype), tmp_path)
    assert torch.equal(run(fresh, x), out)
    loaded = wrapper(fresh).deltas["default"]
    original = wrapper(model).deltas["default"]
    assert torch.equal(loaded.A, original.A) and torch.equal(loaded.B, original.B)
    assert not any(p.requires_grad for p in fresh.parameters()), "dt.load freezes the adapter by default"


@pytest.mark.parametrize(("kind", "dtype"), CASES)
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
    merged_weight = stored_weight(model).detach().clone()
    with dt.disabled(model):
        assert wrapper(model).merged == []
        inside = stored_weight(model).detach().clone()
        assert_restored(inside, stored_weight(build(kind, dtype)), merged_weight, dtype)
        # the base layer alone runs, on the weight as unmerged (bf16: see assert_restored)
        assert torch.equal(run(model, x), run(with_weight(kind, dtype, inside), x))
        if dtype == torch.float32:
            assert_close(run(model, x), base_out, dtype, "disabled while merged vs base output")
    assert wrapper(model).merged == ["default"], "the merge must be restored after the block"
    assert_close(stored_weight(model), merged_weight, dtype, "merged weight after the block")
    assert_close(run(model, x), merged_out, dtype, "merged output after the block")


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_disabled_restores_on_error(kind: Kind, dtype: torch.dtype) -> None:
    model = adapted(kind, dtype)
    dt.merge(model)
    with pytest.raises(RuntimeError, match="inside"), dt.disabled(model):
        raise RuntimeError("inside")
    layer = wrapper(model)
    assert layer.enabled and layer.merged == ["default"]


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_trainable_count_matches_formula(kind: Kind, dtype: torch.dtype) -> None:
    base_total = sum(p.numel() for p in build(kind, dtype).parameters())
    model = adapted(kind, dtype, init=True)
    expected = R * (kind.in_features * math.prod(kind.kernel) + kind.out_features)
    assert dt.trainable_parameters(model) == (expected, base_total + expected)
    assert dt.adapter_parameters(model, "default") == expected


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_adapter_dtype(kind: Kind, dtype: torch.dtype) -> None:
    """Adapters on a bf16 base are kept in fp32, the base stays in its dtype, the output in its."""
    model = adapted(kind, dtype)
    delta = wrapper(model).deltas["default"]
    assert delta.A.dtype == delta.B.dtype == torch.float32
    assert stored_weight(model).dtype == dtype
    assert run(model, make_input(kind, dtype)).dtype == dtype


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_backward_reaches_only_adapter(kind: Kind, dtype: torch.dtype) -> None:
    model = adapted(kind, dtype)
    model.train()
    model(make_input(kind, dtype)).float().square().mean().backward()
    delta = wrapper(model).deltas["default"]
    adapter = {id(delta.A), id(delta.B)}
    for name, param in model.named_parameters():
        if id(param) in adapter:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
            assert param.grad.dtype == torch.float32
        else:
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_embedding_padding_row_gets_no_gradient(dtype: torch.dtype) -> None:
    """As in peft: the lookup into A honours padding_idx, so with the default init (A zero) the
    padding row's delta stays zero through training."""
    kind = next(k for k in KINDS if k.name == "embedding")
    model = adapted(kind, dtype, init=True)
    model.train()
    x = make_input(kind, dtype)
    assert (x == 0).any()
    model(x).float().square().mean().backward()
    grad = wrapper(model).deltas["default"].A.grad
    assert grad is not None and not grad[:, 0].any() and grad[:, 1:].any()
