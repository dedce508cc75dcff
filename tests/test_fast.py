"""``dt.accelerate``: the fused frozen-base kernels give the stock model's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.fast import cross_entropy
from deltatune.fast.cross_entropy import LinearCrossEntropy

from conftest import perturb, state_hash, tiny_bert, tiny_gpt2, tiny_llama, token_ids


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows, so every test crosses chunk boundaries (and a ragged last chunk)."""
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 3 * 128)


def with_ignored(labels: torch.Tensor) -> torch.Tensor:
    """Some rows without a label, as padding and prompt tokens have."""
    labels = labels.clone()
    labels[::4] = cross_entropy.IGNORE_INDEX
    return labels


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_hidden_weight_bias(with_bias: bool) -> None:
    """Gradients for the hidden states, a trained head weight and bias agree with finite differences."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(128, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(128, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = with_ignored(torch.randint(0, 128, (7,), generator=gen))
    assert torch.autograd.gradcheck(LinearCrossEntropy.apply, (hidden, weight, bias, labels, 3.0))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("divisor", [None, 5.0])
def test_loss_and_grad_equal_cross_entropy(divisor: float | None, seed: int) -> None:
    """fp32: the value and the hidden-state gradient of cross-entropy over the full logits, each
    within fp32 rounding of the fp64 result. The gradient's bound is per element: its terms
    ``(p - y)_j W_j`` can cancel, so the error scale is eps * Σ_j |p - y|_j |W_j|, not the result's
    size; stock fp32 ``F.cross_entropy`` is held to the same bound (so the bound is not loose)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(10, 16, generator=gen, requires_grad=True)
    weight = torch.randn(128, 16, generator=gen)
    labels = with_ignored(torch.randint(0, 128, (10,), generator=gen))
    count = float((labels != cross_entropy.IGNORE_INDEX).sum())
    reduction = "mean" if divisor is None else "sum"

    def stock(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w), labels, reduction=reduction) / (divisor or 1.0)

    exact_h = hidden.detach().double().requires_grad_()
    exact = stock(exact_h, weight.double())
    (exact_grad,) = torch.autograd.grad(exact, exact_h)
    logits = F.linear(exact_h.detach(), weight.double())
    scale = (logits.softmax(-1) + F.one_hot(labels.clamp(min=0), 128)) @ weight.double().abs()
    scale = scale * (labels != cross_entropy.IGNORE_INDEX).unsqueeze(1) / (divisor or count)
    bound = 16 * torch.finfo(torch.float32).eps * scale
    for name, loss in (("fused", LinearCrossEntropy.apply(hidden, weight, None, labels, divisor or count)),
                       ("stock", stock(hidden, weight))):
        assert abs(float(loss) - float(exact)) <= 1e-6 * max(1.0, abs(float(exact))), name
        (grad,) = torch.autograd.grad(loss, hidden)
        excess = (grad.double() - exact_grad).abs() - bound
        assert float(excess.max()) <= 0, (name, float(excess.max()))


@pytest.mark.parametrize("gap", [80.0, 95.0, 300.0])
def test_loss_stays_exact_when_the_target_probability_underflows(gap: float) -> None:
    """The target logit ``gap`` below the winner: its fp32 probability is normal (80), subnormal
    (95) or 0 (300), yet the loss (about ``gap`` per row) equals the fp64 cross-entropy: the rows
    whose probability underflowed are recomputed from their logits."""
    hidden = torch.zeros(3, 2)
    hidden[:, 0] = 1.0
    weight = torch.zeros(64, 2)
    weight[5, 0], weight[9, 0] = gap / 2, -gap / 2  # token 5 wins, token 9 is gap below it
    labels = torch.tensor([9, 9, 5])
    got = LinearCrossEntropy.apply(hidden, weight, None, labels, 3.0)
    want = F.cross_entropy(F.linear(hidden.double(), weight.double()), labels)
    assert torch.isfinite(got) and abs(float(got) - float(want)) <= 1e-5 * float(want), (got, want)


def lora_llama() -> nn.Module:
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    perturb(model)
    return model.train()


def loss_and_grads(model: nn.Module, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    found = {"loss": loss.detach()}
    found.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return found


@pytest.mark.parametrize("items", [None, 11])
def test_accelerated_llama_equals_stock(items: int | None) -> None:
    """LoRA on LLaMA: loss and every adapter gradient equal the stock model's; restore undoes it."""
    model = lora_llama()
    ids = token_ids(batch=2, length=12)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that carries no loss
    inputs = {"input_ids": ids, "labels": labels}
    if items is not None:
        inputs["num_items_in_batch"] = torch.tensor(items)
    stock = loss_and_grads(model, **inputs)
    dt.accelerate(model)
    fast = loss_and_grads(model, **inputs)
    assert model(**inputs).logits is None, "with labels the logits are never built"
    assert fast.keys() == stock.keys() and len(stock) > 10
    for name in stock:
        torch.testing.assert_close(fast[name], stock[name], rtol=1e-5, atol=1e-6, msg=name)
    dt.restore(model)
    assert "forward" not in model.__dict__
    torch.testing.assert_close(model(**inputs).logits, model.eval()(**inputs).logits)


def test_accelerated_gpt2_equals_stock() -> None:
    """LoRA on GPT-2 (Conv1D, tied head, dropout on): the same loss and adapter gradients through
    the fused loss and the fused tanh GELU; restore undoes both."""
    model = tiny_gpt2()
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    perturb(model)
    model.train()
    gelus = [m for m in model.modules() if type(m).__name__ == "NewGELUActivation"]
    ids = token_ids(batch=2, length=12)
    torch.manual_seed(5)  # the same dropout masks in both passes
    stock = loss_and_grads(model, input_ids=ids, labels=ids)
    dt.accelerate(model)
    assert gelus and all("forward" in m.__dict__ for m in gelus) and "forward" in model.__dict__
    torch.manual_seed(5)
    fast = loss_and_grads(model, input_ids=ids, labels=ids)
    assert model(input_ids=ids, labels=ids).logits is None, "the fused loss ran"
    assert fast.keys() == stock.keys() and len(stock) > 10
    for name in stock:
        torch.testing.assert_close(fast[name], stock[name], rtol=1e-5, atol=1e-6, msg=name)
    dt.restore(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_gelu_equals_gpt2s_gelu_new() -> None:
    """F.gelu(tanh) against transformers' NewGELUActivation: values and gradients in fp32, and
    gradcheck of the fused forward in fp64."""
    from transformers.activations import NewGELUActivation

    from deltatune.fast.gelu import fused_gelu_forward

    stock = NewGELUActivation()
    fused = fused_gelu_forward(NewGELUActivation())
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    want = stock(x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    got = fused(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-6, atol=2e-6)
    x64 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (x64,))


def test_without_labels_and_with_an_adapted_head_it_is_the_stock_path() -> None:
    """No labels: logits as before. An adapter on lm_head: the loss is the stock one."""
    model = tiny_llama()
    ids = token_ids()
    before = model(input_ids=ids).logits
    dt.accelerate(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_unsupported_model_is_refused_and_untouched() -> None:
    model = tiny_bert()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="dt.accelerate supports"):
        dt.accelerate(model)
    assert state_hash(model) == before
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_gradcheck(train_weight: bool) -> None:
    """The fused RMSNorm's input (and weight) gradients agree with finite differences."""
    from deltatune.fast.rms_norm import RMSNormFunction

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=train_weight)
    assert torch.autograd.gradcheck(RMSNormFunction.apply, (x, weight, 1e-6))


def test_every_llama_norm_is_fused_and_restored() -> None:
    model = tiny_llama()
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    dt.accelerate(model)
    assert norms and all("forward" in m.__dict__ for m in norms)
    dt.restore(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
