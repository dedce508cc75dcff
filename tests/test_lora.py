"""LoRA behaviours on the tiny models of conftest: named adapters, deleting and unloading,
per-layer rank/alpha patterns, rsLoRA, the PiSSA/OLoRA inits, targeting and saved modules.

Single-layer invariants per base kind and dtype live in test_invariants.py (the factors' layout
per kind is checked here); here the whole-model behaviour is checked, with the layer-level oracles
where the model is not linear in the deltas.
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from battery_cases import DTYPES, KIND, METHOD, Kind, adapted, delta_of, make_input
from conftest import close, conv_net, state_hash, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from deltatune.layer import DeltaLayer, SavedModule
from deltatune.methods.lora import LoraDelta


@dataclass(frozen=True)
class Fixture:
    """A tiny model, its input and the LoRA settings that fit it."""

    name: str
    build: Callable[[], nn.Module]
    ids: Callable[[], Tensor]
    settings: dict[str, Any]


FIXTURES = [
    Fixture("llama", tiny_llama, token_ids, {}),
    Fixture("gpt2", tiny_gpt2, token_ids, {"target_modules": ["c_attn", "c_proj"]}),
    Fixture("bert", tiny_bert, token_ids, {"task_type": "SEQ_CLS"}),  # classifier becomes a saved module
    Fixture("conv_net", conv_net, lambda: token_ids(vocab=20),
            {"target_modules": ["embed", "conv1", "conv2", "pointwise", "head"]}),
]
BY_NAME = {f.name: f for f in FIXTURES}
ALL = pytest.mark.parametrize("fx", FIXTURES, ids=[f.name for f in FIXTURES])


# ----------------------------------------------------------------------------------------- helpers

def lora(fx: Fixture | None = None, **changes: Any) -> dt.LoraConfig:
    """A LoRA config for ``fx`` with non-zero B (so adapters change outputs) unless overridden."""
    fields: dict[str, Any] = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **(fx.settings if fx else {})}
    return dt.LoraConfig(**{**fields, **changes})


@torch.no_grad()
def outputs(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    return getattr(out, "logits", out)


def wrapped(model: nn.Module) -> dict[str, DeltaLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DeltaLayer)}


def module_types(model: nn.Module) -> dict[str, type[nn.Module]]:
    return {name: type(m) for name, m in model.named_modules()}


def has_deltatune_modules(model: nn.Module) -> bool:
    return any(isinstance(m, (DeltaLayer, SavedModule, LoraDelta)) for m in model.modules())


def delta(model: nn.Module, key: str, name: str = "default") -> LoraDelta:
    found = wrapped(model)[key].deltas[name]
    assert isinstance(found, LoraDelta)
    return found


def perturb_saved_copies(model: nn.Module) -> None:
    """Make every saved module's copy differ from its original, as training would."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SavedModule):
                for p in module.copies.parameters():
                    p.add_(torch.randn_like(p) * 0.1)


def layer_inputs(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    """The input each adapted layer receives when the model runs with adapters disabled."""
    seen: dict[str, Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, key=key: seen.setdefault(key, args[0]))
             for key, layer in wrapped(model).items()]
    try:
        with dt.disabled(model):
            outputs(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def dense_delta(d: LoraDelta) -> Tensor:
    """``s * B @ A`` in the canonical (out, in, *kernel) layout, in fp64, computed here by hand."""
    product = d.B.detach().double().flatten(1) @ d.A.detach().double().flatten(1)
    return d.scaling * product.view(d.B.shape[0], *d.A.shape[1:])


def canonical(layer: nn.Module) -> Tensor:
    """A linear-like layer's weight as (out, in): GPT-2's Conv1D stores (in, out)."""
    weight = layer.weight.detach()
    return weight.t() if isinstance(layer, Conv1D) else weight


# -------------------------------------------------------------------------------- named adapters

@ALL
def test_two_adapters_active_sum(fx: Fixture) -> None:
    model, ids = fx.build(), fx.ids()
    base = outputs(model, ids)
    dt.attach(model, lora(fx), name="a")
    dt.attach(model, lora(fx, r=2), name="b")
    assert dt.active_adapters(model) == ("a",), "attaching a second adapter must not change the active set"
    assert dt.adapter_names(model) == ["a", "b"]
    out_a = outputs(model, ids)
    dt.set_active(model, "b")
    out_b = outputs(model, ids)
    dt.set_active(model, ["a", "b"])
    assert dt.active_adapters(model) == ("a", "b")
    out_ab = outputs(model, ids)
    assert not close(out_a, base) and not close(out_b, base) and not close(out_ab, out_a)

    # each adapted layer computes base + delta_a + delta_b (the model as a whole is not linear)
    for key, x in layer_inputs(model, ids).items():
        layer = wrapped(model)[key]
        with torch.no_grad():
            y = layer.base_layer(x)
            dt.set_active(model, "a")
            ya = layer(x)
            dt.set_active(model, "b")
            yb = layer(x)
            dt.set_active(model, ["a", "b"])
            yab = layer(x)
        assert close(yab - y, (ya - y) + (yb - y)), key

    # whole model: the sum is what merging both computes
    dt.merge(model)
    assert close(outputs(model, ids), out_ab)
    dt.unmerge(model)  # fp32 rounding: the weights come back within 1e-6, not bit for bit
    assert close(outputs(model, ids), out_ab)
    with dt.disabled(model):
        assert close(outputs(model, ids), base)


def test_attach_keeps_multi_active_set() -> None:
    model = tiny_llama()
    dt.attach(model, lora(), name="a")
    dt.attach(model, lora(), name="b")
    dt.set_active(model, ["b", "a"])
    dt.attach(model, lora(target_modules=["k_proj"]), name="c")
    assert dt.active_adapters(model) == ("b", "a")
    assert all(layer.active == ("b", "a") for layer in wrapped(model).values())


def test_set_active_unknown_name_raises() -> None:
    model = tiny_llama()
    dt.attach(model, lora(), name="a")
    with pytest.raises(dt.AdapterError, match="nope"):
        dt.set_active(model, "nope")
    with pytest.raises(dt.AdapterError):
        dt.set_active(model, ["a", "nope"])
    assert dt.active_adapters(model) == ("a",)


def test_attach_existing_name_raises_and_leaves_model() -> None:
    model = tiny_llama()
    dt.attach(model, lora(), name="a")
    before = state_hash(model)
    with pytest.raises(dt.AdapterError, match="already attached"):
        dt.attach(model, lora(r=2), name="a")
    assert state_hash(model) == before
    assert delta(model, "model.layers.0.self_attn.q_proj", "a").A.shape[0] == 4


def test_summary_mentions_adapters() -> None:
    model = tiny_llama()
    dt.attach(model, lora(), name="first")
    dt.attach(model, lora(target_modules=["k_proj"]), name="second")
    text = dt.summary(model)
    assert "first" in text and "second" in text and "LORA" in text
    assert f"{dt.adapter_parameters(model, 'first'):,}" in text
    assert "trainable" in text


# ------------------------------------------------------------------------------ delete and unload

@ALL
def test_delete_adapter_frees_and_unwraps(fx: Fixture) -> None:
    model, ids = fx.build(), fx.ids()
    keys, types, base = list(model.state_dict()), module_types(model), outputs(model, ids)
    dt.attach(model, lora(fx), name="a")
    dt.attach(model, lora(fx), name="b")
    layers = wrapped(model)
    key = next(iter(layers))
    refs = [weakref.ref(delta(model, key, "a")), weakref.ref(delta(model, key, "a").A)]
    dt.set_active(model, "b")
    out_b = outputs(model, ids)

    dt.delete_adapter(model, "a")
    gc.collect()
    assert all(ref() is None for ref in refs), "adapter 'a' is still referenced after delete_adapter"
    assert dt.adapter_names(model) == ["b"]
    assert all("a" not in layer.deltas for layer in wrapped(model).values())
    assert torch.equal(outputs(model, ids), out_b)
    assert not any(".a." in k for k in model.state_dict())

    refs = [weakref.ref(p) for layer in wrapped(model).values() for p in layer.deltas.parameters()]
    dt.delete_adapter(model, "b")
    gc.collect()
    assert refs and all(ref() is None for ref in refs)
    assert not has_deltatune_modules(model)
    assert module_types(model) == types, "layers must be unwrapped back to their original classes"
    assert list(model.state_dict()) == keys
    assert torch.equal(outputs(model, ids), base)


def test_delete_merged_adapter_keeps_others() -> None:
    model, ids = tiny_llama(), token_ids()
    dt.attach(model, lora(), name="a")
    dt.attach(model, lora(), name="b")
    dt.set_active(model, "b")
    out_b = outputs(model, ids)
    dt.set_active(model, ["a", "b"])
    dt.merge(model)
    dt.delete_adapter(model, "a")
    assert dt.active_adapters(model) == ("b",)
    assert all(layer.merged == ["b"] for layer in wrapped(model).values())
    assert close(outputs(model, ids), out_b)
    dt.unmerge(model)
    assert close(outputs(model, ids), out_b)


def test_delete_merged_adapter_does_not_merge_unmerged_ones() -> None:
    model = tiny_llama()
    dt.attach(model, lora(), name="a")
    dt.attach(model, lora(), name="b")
    dt.set_active(model, ["a", "b"])
    dt.merge(model, "a")
    dt.delete_adapter(model, "a")
    assert all(layer.merged == [] for layer in wrapped(model).values())


@ALL
def test_unload_merge_returns_plain_model(fx: Fixture) -> None:
    model, ids = fx.build(), fx.ids()
    keys, types = list(model.state_dict()), module_types(model)
    dt.attach(model, lora(fx))
    perturb_saved_copies(model)
    adapted = outputs(model, ids)
    plain = dt.unload(model, merge=True)
    assert plain is model
    assert not has_deltatune_modules(plain)
    assert module_types(plain) == types
    assert list(plain.state_dict()) == keys
    assert close(outputs(plain, ids), adapted)
    with pytest.raises(dt.AdapterError):
        dt.adapter_names(plain)
    assert dt.attach(plain, lora(fx)) is plain, "an unloaded model takes adapters again"


@ALL
@pytest.mark.parametrize("merged_first", [False, True], ids=["unmerged", "merged"])
def test_unload_without_merge_gives_base(fx: Fixture, merged_first: bool) -> None:
    model, ids = fx.build(), fx.ids()
    keys, base = list(model.state_dict()), outputs(model, ids)
    dt.attach(model, lora(fx))
    perturb_saved_copies(model)
    if merged_first:
        dt.merge(model)
    dt.unload(model, merge=False)
    assert not has_deltatune_modules(model)
    assert list(model.state_dict()) == keys
    out = outputs(model, ids)
    assert close(out, base) if merged_first else torch.equal(out, base)


# ------------------------------------------------------------------------ ranks, alphas, scaling

def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    model, ids = tiny_llama(), token_ids()
    config = lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                  rank_pattern={"model.layers.1.self_attn.q_proj": 6, "q_proj": 2},  # first match wins
                  alpha_pattern={"v_proj": 32})
    dt.attach(model, config)
    hidden = 32
    expected = {  # module -> (r, scaling)
        "model.layers.0.self_attn.q_proj": (2, 8 / 2),
        "model.layers.1.self_attn.q_proj": (6, 8 / 6),
        "model.layers.0.self_attn.v_proj": (4, 32 / 4),
        "model.layers.1.self_attn.v_proj": (4, 32 / 4),
        "model.layers.0.self_attn.o_proj": (4, 8 / 4),
        "model.layers.1.self_attn.o_proj": (4, 8 / 4),
    }
    assert set(wrapped(model)) == set(expected)
    count = 0
    for key, (r, scaling) in expected.items():
        d = delta(model, key)
        out_features, in_features = wrapped(model)[key].base_layer.weight.shape
        assert d.A.shape == (r, in_features) and d.B.shape == (out_features, r), key
        assert d.scaling == pytest.approx(scaling), key
        count += r * (in_features + out_features)
    assert dt.adapter_parameters(model, "default") == count == dt.trainable_parameters(model)[0]

    out = outputs(model, ids)
    dt.save(model, tmp_path)
    fresh = dt.load(tiny_llama(), tmp_path)
    assert torch.equal(outputs(fresh, ids), out)
    assert delta(fresh, "model.layers.1.self_attn.q_proj").A.shape == (6, hidden)


@pytest.mark.parametrize(("r", "alpha"), [(16, 8), (4, 16)])
def test_rslora_scaling(r: int, alpha: float) -> None:
    model = tiny_llama()
    q = "model.layers.0.self_attn.q_proj"
    original = model.get_submodule(q).weight.detach().clone()
    dt.attach(model, lora(r=r, lora_alpha=alpha, use_rslora=True, target_modules=["q_proj"]))
    d = delta(model, q)
    assert d.scaling == pytest.approx(alpha / math.sqrt(r))
    dt.merge(model)
    by_hand = alpha / math.sqrt(r) * (d.B.detach().double() @ d.A.detach().double())
    change = wrapped(model)[q].base_layer.weight.double() - original.double()
    torch.testing.assert_close(change, by_hand, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ PiSSA and OLoRA

INIT_CASES = [pytest.param(BY_NAME[m], init, id=f"{m}-{init}")
              for m in ("llama", "gpt2") for init in ("pissa", "pissa_niter_4", "olora")]


@pytest.mark.parametrize(("fx", "init"), INIT_CASES)
def test_weight_based_init_keeps_output(fx: Fixture, init: str) -> None:
    reference, ids = fx.build(), fx.ids()
    base = outputs(reference, ids)
    model = fx.build()
    dt.attach(model, lora(fx, r=4, lora_alpha=8, init_lora_weights=init, target_modules=None))
    assert close(outputs(model, ids), base), "the adapted model must start where the base model is"
    originals = dict(reference.named_modules())
    for key, layer in wrapped(model).items():
        d = delta(model, key)
        w0 = canonical(originals[key]).double()
        residual = canonical(layer.base_layer).double()
        assert not torch.allclose(residual, w0), f"{key}: the base weight was not replaced by the residual"
        torch.testing.assert_close(residual, w0 - dense_delta(d), atol=1e-5, rtol=1e-5)
        r = d.A.shape[0]
        if init == "pissa":  # s * B @ A is the best rank-r approximation of W
            u, s, vh = torch.linalg.svd(w0, full_matrices=False)
            torch.testing.assert_close(dense_delta(d), (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5, rtol=1e-4)
            assert torch.linalg.matrix_norm(residual, 2).item() == pytest.approx(s[r].item(), rel=1e-4)
        elif init == "olora":  # B holds orthonormal columns (the first r of Q)
            b = d.B.detach().double()
            torch.testing.assert_close(b.t() @ b, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.linalg.matrix_rank(dense_delta(d)).item() == r


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_based_init_save_load(init: str, tmp_path: Path) -> None:
    """As in peft, the saved config keeps the init, so loading re-derives the same residual base."""
    model, ids = tiny_llama(), token_ids()
    dt.attach(model, lora(init_lora_weights=init))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # "training"
    out = outputs(model, ids)
    dt.save(model, tmp_path)
    assert close(outputs(dt.load(tiny_llama(), tmp_path), ids), out)


def test_weight_based_init_on_embedding_raises_and_leaves_model() -> None:
    model = conv_net()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="linear"):
        dt.attach(model, lora(init_lora_weights="pissa", target_modules=["embed", "head"]))
    assert state_hash(model) == before
    assert not has_deltatune_modules(model)


# -------------------------------------------------------------------------------------- targeting

@pytest.mark.parametrize(("fx", "changes", "expected"), [
    pytest.param(BY_NAME["llama"], {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
                 {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}, id="llama"),
    pytest.param(BY_NAME["gpt2"], {"target_modules": ["c_attn"], "layers_to_transform": 0, "layers_pattern": "h"},
                 {"transformer.h.0.attn.c_attn"}, id="gpt2-pattern"),
    pytest.param(BY_NAME["bert"], {"target_modules": ["query"], "layers_to_transform": [1],
                                   "layers_pattern": "layer"},
                 {"bert.encoder.layer.1.attention.self.query"}, id="bert-pattern"),
])
def test_layers_to_transform(fx: Fixture, changes: dict[str, Any], expected: set[str]) -> None:
    model = fx.build()
    dt.attach(model, lora(fx, **changes))
    assert set(wrapped(model)) == expected


@pytest.mark.parametrize("fx", [BY_NAME["llama"], BY_NAME["gpt2"], BY_NAME["bert"]], ids=["llama", "gpt2", "bert"])
def test_all_linear_skips_output_head(fx: Fixture) -> None:
    model = fx.build()
    linear = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    head = {"llama": "lm_head", "gpt2": "lm_head", "bert": "classifier"}[fx.name]
    assert head in linear
    dt.attach(model, lora(fx, target_modules="all-linear"))
    assert set(wrapped(model)) == linear - {head}
    if fx.name == "bert":  # SEQ_CLS: the head is trained in full instead
        assert isinstance(model.classifier, SavedModule)


@pytest.mark.parametrize(("fx", "suffixes"), [
    (BY_NAME["llama"], {"q_proj", "v_proj"}), (BY_NAME["gpt2"], {"c_attn"}), (BY_NAME["bert"], {"query", "value"})
], ids=["llama", "gpt2", "bert"])
def test_default_targets(fx: Fixture, suffixes: set[str]) -> None:
    model = fx.build()
    dt.attach(model, lora(fx, target_modules=None))
    names = set(wrapped(model))
    assert {n.rsplit(".", 1)[-1] for n in names} == suffixes
    assert len(names) == 2 * len(suffixes)  # two transformer layers each


# ------------------------------------------------------------------ the factors' layout per kind
# The invariants (identity for every init that promises it, the fp64 oracle with and without
# rsLoRA, merge / unmerge, save / load, disabled, count, gradients, compositions, peft cross-load)
# run for LoRA on every base kind and dtype in test_invariants.py.

FACTOR_KINDS = [pytest.param(KIND[name], dtype, init, id=f"{name}-{str(dtype).removeprefix('torch.')}-{init}")
                for name in METHOD["lora"].kinds for dtype in DTYPES for init in (True, "gaussian")]


@pytest.mark.parametrize(("kind", "dtype", "init"), FACTOR_KINDS)
def test_factor_shapes_and_which_starts_at_zero(kind: Kind, dtype: torch.dtype, init: bool | str) -> None:
    """A: (r, in, *kernel), B: (out, r, 1, ...), both fp32 on any base; peft's zero factor is B,
    but A for an embedding (whose B is then normal)."""
    d = delta_of(adapted(METHOD["lora"], kind, dtype, random=False, init_lora_weights=init))
    r = METHOD["lora"].kwargs["r"]
    assert d.A.shape == (r, kind.in_features, *kind.kernel)
    assert d.B.shape == (kind.out_features, r, *(1,) * len(kind.kernel))
    assert d.A.dtype == d.B.dtype == torch.float32
    zero, other = (d.A, d.B) if kind.name == "embedding" else (d.B, d.A)
    assert not zero.any() and other.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_embedding_padding_row_gets_no_gradient(dtype: torch.dtype) -> None:
    """As in peft: the lookup into A honours padding_idx, so with the default init (A zero) the
    padding row's delta stays zero through training."""
    kind = KIND["embedding"]
    model = adapted(METHOD["lora"], kind, dtype, random=False).train()
    x = make_input(kind, dtype)
    assert (x == 0).any()
    model(x).float().square().mean().backward()
    grad = delta_of(model).A.grad
    assert grad is not None and not grad[:, 0].any() and grad[:, 1:].any()


# ------------------------------------------------------------------------------- modules_to_save

def test_modules_to_save_trains_copy_only(tmp_path: Path) -> None:
    model, ids = tiny_bert(), token_ids()
    base = outputs(model, ids)
    original_head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, lora(init_lora_weights=True, modules_to_save=["classifier"]))
    head = model.classifier
    assert isinstance(head, SavedModule)
    copy_params = list(head.copies["default"].parameters())
    assert all(p.requires_grad for p in copy_params)
    assert not any(p.requires_grad for p in head.original_module.parameters())
    lora_count = sum(p.numel() for layer in wrapped(model).values() for p in layer.deltas.parameters())
    head_count = sum(p.numel() for p in copy_params)
    assert dt.adapter_parameters(model, "default") == lora_count + head_count == dt.trainable_parameters(model)[0]

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    labels = torch.tensor([0, 2])
    for _ in range(3):
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.equal(head.copies["default"].weight, original_head["weight"]), "the copy was trained"
    for k, v in head.original_module.state_dict().items():
        assert torch.equal(v, original_head[k]), f"the original classifier.{k} changed"
    for k, v in model.state_dict().items():  # every base parameter is untouched
        plain = k.replace("base_layer.", "").replace("original_module.", "")
        if "deltas" not in k and "copies" not in k:
            assert torch.equal(v, frozen_before[plain]), k
    with dt.disabled(model):
        assert torch.equal(outputs(model, ids), base)
    trained = outputs(model, ids)
    dt.save(model, tmp_path)
    assert torch.equal(outputs(dt.load(tiny_bert(), tmp_path), ids), trained)


# ------------------------------------------------------------------------ regressions of fixed bugs

def test_deepcopy_adapted_model() -> None:
    model, ids = tiny_llama(), token_ids()
    dt.attach(model, lora())
    clone = copy.deepcopy(model)
    assert torch.equal(outputs(clone, ids), outputs(model, ids))
    assert dt.active_adapters(clone) == ("default",)


def test_second_attach_keeps_trained_biases() -> None:
    model = tiny_bert()
    dt.attach(model, lora(bias="all"), name="a")
    bias = model.bert.encoder.layer[0].attention.output.dense.bias
    assert bias.requires_grad
    dt.attach(model, lora(), name="b")
    assert dt.active_adapters(model) == ("a",)
    assert bias.requires_grad
