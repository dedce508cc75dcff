"""The fused Pfeiffer site (methods/bottleneck_fused.py) and the general path's shortcuts around it:
where the fused path runs, that it gives the general path's outputs (the same bits) and gradients
(to rounding: checked in float64), and that everything else falls back and is unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
import deltatune.methods.bottleneck_compose as compose
import deltatune.methods.bottleneck_fused as fused
from conftest import perturb_site_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from deltatune.methods.bottleneck_block import site_output
from deltatune.sites import model_sites, site_holder

FUSED_NODE = "SerialSiteBackward"


def tiny_distilbert(seed: int = 0) -> nn.Module:
    """DistilBERT: a post-LN model whose site owner is the layer norm itself."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
                              num_labels=3)
    return DistilBertForSequenceClassification(config).eval()


POST_LN: dict[str, Callable[[], nn.Module]] = {"bert": tiny_bert, "distilbert": tiny_distilbert}
PRE_LN: dict[str, Callable[[], nn.Module]] = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def adapted(make: Callable[[], nn.Module], config: dt.BnConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = make().to(dtype)
    dt.attach(model, config)
    perturb_site_adapters(model, seed=3, scale=0.1)
    return model


def site_nodes(model: nn.Module, ids: Tensor) -> list[str]:
    """The autograd node that makes each adapter site's output, in one forward with gradients."""
    found: list[str] = []
    hooks = []
    for site in model_sites(model):
        holder = site_holder(model, site.key_path, create=False)
        if holder is not None and len(holder):
            module = site.owner if site.owner is not None else site.hidden

            def record(module: nn.Module, args: Any, output: Any) -> None:
                first = output[0] if isinstance(output, tuple) else output
                found.append(type(first.grad_fn).__name__)
            hooks.append(module.register_forward_hook(record))
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def logits_and_grads(model: nn.Module, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and every trainable parameter's gradient of a fixed weighted sum of them."""
    model.zero_grad(set_to_none=True)
    logits = model(ids)[0]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (logits * weights.to(logits.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@contextmanager
def general_path(monkeypatch: pytest.MonkeyPatch, reuse_own: bool = True) -> Iterator[None]:
    """No fused site; with ``reuse_own`` False, nor the owner's ``LN(h + x)`` reused (the code before both)."""
    with monkeypatch.context() as patch:
        patch.setattr(fused, "ENABLED", False)
        if not reuse_own:
            original = compose.site_input

            def fresh(*args: Any, normed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
                return original(*args[:5])
            patch.setattr(compose, "site_input", fresh)
        yield


def assert_same(a: tuple[Tensor, dict[str, Tensor]], b: tuple[Tensor, dict[str, Tensor]], rtol: float) -> None:
    assert torch.equal(a[0], b[0])  # the fused forward runs the general path's operations in its order
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], rtol=rtol, atol=0.0 if rtol == 0 else 1e-14), name


@pytest.mark.parametrize("arch", POST_LN)
@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_fused_site_runs_at_post_ln_sites_and_matches_the_general_path_in_float64(
        arch: str, scaling: float, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = adapted(POST_LN[arch], dt.SeqBnConfig(mh_adapter=True, reduction_factor=4, scaling=scaling),
                         torch.float64), token_ids()
    for p in model.get_input_embeddings().parameters():  # gradients reach h and x at every site
        p.requires_grad_(True)
    assert site_nodes(model, ids) == [FUSED_NODE] * 4
    fast = logits_and_grads(model, ids)
    with general_path(monkeypatch, reuse_own=False):
        assert FUSED_NODE not in site_nodes(model, ids)
        slow = logits_and_grads(model, ids)
    assert_same(fast, slow, rtol=1e-10)
    assert any("embeddings" in n for n in fast[1])


@pytest.mark.parametrize("arch", POST_LN)
def test_fused_site_in_float32_same_logits_close_gradients_and_the_inference_forward(
        arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = adapted(POST_LN[arch], dt.SeqBnConfig(reduction_factor=4)), token_ids()
    fast = logits_and_grads(model, ids)
    with general_path(monkeypatch):
        slow = logits_and_grads(model, ids)
    assert_same(fast, slow, rtol=1e-4)
    with torch.no_grad():
        assert FUSED_NODE not in site_nodes(model, ids)
        assert torch.equal(model(ids)[0], fast[0])


def test_train_mode_dropout_falls_back_and_eval_mode_fuses() -> None:
    model, ids = adapted(tiny_bert, dt.SeqBnConfig(reduction_factor=4, dropout=0.1)), token_ids()
    assert site_nodes(model.train(), ids) == ["NativeLayerNormBackward0"] * 2
    assert site_nodes(model.eval(), ids) == [FUSED_NODE] * 2


@pytest.mark.parametrize("config", [
    dt.SeqBnConfig(non_linearity="swish"), dt.SeqBnConfig(ln_after=True), dt.SeqBnConfig(scaling="learned"),
    dt.SeqBnConfig(residual_before_ln=False), dt.SeqBnConfig(use_gating=True)], ids=str)
def test_other_blocks_take_the_general_path(config: dt.BnConfig) -> None:
    model = adapted(tiny_bert, config)
    assert FUSED_NODE not in site_nodes(model, token_ids())


def test_a_trained_site_norm_or_a_frozen_adapter_takes_the_general_path() -> None:
    model, ids = adapted(tiny_bert, dt.SeqBnConfig(reduction_factor=4)), token_ids()
    norm = model.bert.encoder.layer[0].output.LayerNorm
    norm.weight.requires_grad_(True)
    assert site_nodes(model, ids) == ["NativeLayerNormBackward0", FUSED_NODE]
    assert logits_and_grads(model, ids)[1]["bert.encoder.layer.0.output.LayerNorm.weight"].abs().sum() > 0
    norm.weight.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(False)
    assert site_nodes(model, ids) == ["NoneType"] * 2


def test_a_double_backward_needs_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = adapted(tiny_bert, dt.SeqBnConfig(reduction_factor=4)), token_ids()
    params = [p for n, p in model.named_parameters() if p.requires_grad and "layer.1." in n]
    for p in model.parameters():  # the last layer's adapter only: no double backward through attention
        p.requires_grad_(any(p is q for q in params))

    def penalty() -> Tensor:
        grads = torch.autograd.grad(model(ids)[0].pow(2).sum(), params, create_graph=True)
        return sum(g.pow(2).sum() for g in grads)  # type: ignore[return-value]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        penalty().backward()
    with general_path(monkeypatch):
        penalty().backward()


CONFIGS = {"seq": dt.SeqBnConfig(reduction_factor=4), "double": dt.DoubleSeqBnConfig(reduction_factor=4),
           "par": dt.ParBnConfig(), "no_ln_after": dt.SeqBnConfig(reduction_factor=4, original_ln_after=False),
           "post_add": dt.SeqBnConfig(reduction_factor=4, residual_before_ln="post_add"),
           "dropout": dt.SeqBnConfig(reduction_factor=4, dropout=0.2)}


def _old_post(block: Any, out: Tensor, h: Tensor, x: Tensor, norm: Any, adds: bool) -> Tensor:
    """The post step as it was: a zero residual added at every pre-LN site."""
    if not adds:
        return site_output(block, out, h, x, norm)
    result = site_output(block, out, h, torch.zeros_like(x), None)
    return result if block.original_ln_after else result - x


@pytest.mark.parametrize("arch", PRE_LN)
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "post_add"])
def test_pre_ln_models_give_the_results_of_before(arch: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = adapted(PRE_LN[arch], CONFIGS[name]), token_ids()
    model.train(name == "dropout")
    torch.manual_seed(0)
    now = logits_and_grads(model, ids)
    assert FUSED_NODE not in site_nodes(model, ids)
    with general_path(monkeypatch, reuse_own=False):
        monkeypatch.setattr(compose, "_post", _old_post)
        torch.manual_seed(0)
        before = logits_and_grads(model, ids)
    assert_same(now, before, rtol=0.0)


@pytest.mark.parametrize("name", CONFIGS)
def test_post_ln_general_path_reusing_the_owners_norm_gives_the_results_of_before(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = adapted(tiny_bert, CONFIGS[name], torch.float64), token_ids()
    model.train(name == "dropout")
    with general_path(monkeypatch):
        torch.manual_seed(0)
        now = logits_and_grads(model, ids)
    with general_path(monkeypatch, reuse_own=False):
        torch.manual_seed(0)
        before = logits_and_grads(model, ids)
    assert_same(now, before, rtol=1e-10)  # gradients summed in another order where post_add adds h + x again


@pytest.mark.parametrize("composition", [dt.Stack("a", "b"), dt.Average("a", "b"), dt.BatchSplit("a", "b", sizes=[1, 1]),
                                         dt.Fuse("a", "b"), dt.Sum("b")], ids=repr)
def test_compositions_at_post_ln_sites_give_the_results_of_before(composition: dt.Composition,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = tiny_bert().double(), token_ids()
    dt.attach(model, dt.SeqBnConfig(reduction_factor=4), name="a")
    dt.attach(model, dt.SeqBnConfig(reduction_factor=8, residual_before_ln="post_add"), name="b")
    dt.attach(model, dt.FusionConfig(adapter_names=["a", "b"], dropout_prob=0.0), name="ab")
    perturb_site_adapters(model, seed=5, scale=0.1)
    dt.set_active(model, composition)
    for n, p in model.named_parameters():
        p.requires_grad_("site_adapters" in n)
    now = logits_and_grads(model, ids)
    with general_path(monkeypatch, reuse_own=False):
        before = logits_and_grads(model, ids)
    assert_same(now, before, rtol=1e-10)


def test_fused_site_over_a_bf16_base_with_its_fp32_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter is fp32 over a bf16 base (``adapter_dtype``): the fused site still runs, its logits are the
    general path's bits, its gradients are fp32 and differ from the general path's only by where LN2's input is
    rounded to bf16 (one rounding of relative size 2^-8 on each side: a bound of 2^-7 in norm)."""
    model, ids = adapted(tiny_bert, dt.SeqBnConfig(mh_adapter=True, reduction_factor=4, scaling=0.5),
                         torch.bfloat16), token_ids()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert site_nodes(model, ids) == [FUSED_NODE] * 4
    fast = logits_and_grads(model, ids)
    with general_path(monkeypatch):
        assert FUSED_NODE not in site_nodes(model, ids)
        slow = logits_and_grads(model, ids)
    assert fast[0].dtype == torch.bfloat16 and torch.equal(fast[0], slow[0])
    assert fast[1].keys() == slow[1].keys() and len(fast[1]) == 16
    bound = 2 * torch.finfo(torch.bfloat16).eps / 2
    for name, grad in fast[1].items():
        assert grad.dtype == torch.float32, name
        assert float((grad - slow[1][name]).norm()) <= bound * float(slow[1][name].norm()), name
