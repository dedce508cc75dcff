"""Bottleneck adapters integrated at module-output sites: the invariants that hold without the
AdapterHub oracle (which checks the numbers themselves, in tests/adapters_oracle)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import lm_losses, outputs, perturb_site_adapters, state_hash, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, token_ids

MODELS: dict[str, Callable[[], nn.Module]] = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5}


def structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize("arch", MODELS)
def test_parallel_preset_starts_as_the_identity_and_disabled_is_the_base(arch: str) -> None:
    model, ids = MODELS[arch]().eval(), token_ids()
    base = outputs(model, ids)
    dt.attach(model, dt.ParBnConfig())
    assert torch.equal(outputs(model, ids), base)  # zero up projection: the site adds exactly nothing
    dt.attach(model, dt.DoubleSeqBnConfig(), name="h")
    dt.set_active(model, "h")
    perturb_site_adapters(model, seed=3, scale=0.1)
    assert not torch.allclose(outputs(model, ids), base)
    with dt.disabled(model):
        assert torch.equal(outputs(model, ids), base)
    assert not torch.allclose(outputs(model, ids), base)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("preset", [dt.SeqBnConfig, dt.DoubleSeqBnConfig, dt.ParBnConfig])
def test_save_load_gives_the_same_outputs_and_delete_restores_the_model(arch: str, preset: Callable[..., dt.BnConfig],
                                                                       tmp_path: Path) -> None:
    model, ids = MODELS[arch]().eval(), token_ids()
    before, modules = state_hash(model), structure(model)
    dt.attach(model, preset(reduction_factor=4))
    perturb_site_adapters(model, seed=3, scale=0.1)
    out = outputs(model, ids)
    dt.save(model, tmp_path / "a")
    fresh = dt.load(MODELS[arch]().eval(), tmp_path / "a")
    assert torch.equal(outputs(fresh, ids), out)
    dt.delete_adapter(model, "default")
    assert state_hash(model) == before and structure(model) == modules


@pytest.mark.parametrize("arch", MODELS)
def test_parameters_are_in_the_module_tree_and_counted(arch: str) -> None:
    model = MODELS[arch]()
    dt.attach(model, dt.DoubleSeqBnConfig(reduction_factor=4))
    hidden = model.config.to_dict().get("hidden_size") or model.config.to_dict().get("n_embd") or model.config.d_model
    bottleneck = hidden // 4
    sites = sum(1 for name, _ in model.named_modules() if name.endswith("site_adapters.default"))
    per_site = 2 * hidden * bottleneck + hidden + bottleneck  # down and up weights and biases
    trainable, _ = dt.trainable_parameters(model)
    assert trainable == sites * per_site == dt.adapter_parameters(model, "default")
    assert all(p.requires_grad == ("site_adapters" in n) for n, p in model.named_parameters())


def test_training_changes_only_the_adapter() -> None:
    model, ids = tiny_llama(), token_ids()
    dt.attach(model, dt.SeqBnConfig(reduction_factor=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = lm_losses(model, ids, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("call", [lambda m: dt.merge(m), lambda m: dt.unload(m, merge=True)])
def test_merging_is_refused_with_the_model_unchanged(call: Callable[[nn.Module], object]) -> None:
    model = tiny_bert()
    dt.attach(model, dt.DoubleSeqBnConfig())
    before, modules = state_hash(model), structure(model)
    with pytest.raises(dt.AdapterError, match="change activations, not weights"):
        call(model)
    assert state_hash(model) == before and structure(model) == modules


def test_unload_without_merge_gives_the_plain_model_back() -> None:
    model, ids = tiny_gpt2().eval(), token_ids()
    before, modules, base = state_hash(model), structure(model), outputs(model, ids)
    dt.attach(model, dt.DoubleSeqBnConfig())
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["c_attn"]), name="lora")
    dt.unload(model, merge=False)
    assert state_hash(model) == before and structure(model) == modules and torch.equal(outputs(model, ids), base)


def two_adapters(arch: str = "bert") -> nn.Module:
    model = MODELS[arch]().eval()
    dt.attach(model, dt.SeqBnConfig(reduction_factor=4), name="a")
    dt.attach(model, dt.SeqBnConfig(reduction_factor=8), name="b")
    perturb_site_adapters(model, seed=3, scale=0.1)
    return model


def outputs_of(model: nn.Module, active: object, ids: torch.Tensor) -> torch.Tensor:
    dt.set_active(model, active)  # type: ignore[arg-type]
    return outputs(model, ids)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_batch_split_rows_equal_each_adapter_alone(arch: str) -> None:
    model, ids = two_adapters(arch), token_ids(batch=3)
    a, b = outputs_of(model, "a", ids), outputs_of(model, "b", ids)
    split = outputs_of(model, dt.BatchSplit("a", "b", sizes=[1, 2]), ids)
    torch.testing.assert_close(split, torch.cat([a[:1], b[1:]]), atol=1e-6, rtol=0)


def test_average_is_adapterhubs_mean_of_weighted_outputs() -> None:
    """AdapterHub's Average is the mean of w_i * o_i (weights normalised): for two members at one
    site, mean(0.5 o_a, 0.5 o_b) = (o_a + o_b) / 4. Checked against that formula at the first site
    with the site inputs captured from the model."""
    model, ids = two_adapters(), token_ids()
    from deltatune.methods.bottleneck_block import site_input, site_output

    layer = model.bert.encoder.layer[0].output
    dt.set_active(model, dt.Average("a", "b", weights=[1.0, 3.0]))  # installs the site hooks before ours
    seen: dict[str, torch.Tensor] = {}
    handle = layer.dropout.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o))
    pre = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[1]))
    got: dict[str, torch.Tensor] = {}
    post = layer.register_forward_hook(lambda m, a, o: got.__setitem__("y", o))
    outputs(model, ids)
    for h in (handle, pre, post):
        h.remove()
    blocks = layer.site_adapters
    x_in, _, r = site_input(blocks["a"], seen["h"], seen["x"], layer.LayerNorm)
    mixed = (0.25 * blocks["a"](x_in, r)[0] + 0.75 * blocks["b"](x_in, r)[0]) / 2
    want = site_output(blocks["b"], mixed, seen["h"], seen["x"], layer.LayerNorm)
    torch.testing.assert_close(got["y"], want, atol=1e-6, rtol=0)


def test_two_bottleneck_adapters_summed_at_one_site_is_a_clear_error() -> None:
    model, ids = two_adapters(), token_ids()
    dt.set_active(model, ["a", "b"])
    with pytest.raises(dt.AdapterError, match="dt.Stack or dt.Average"):
        outputs(model, ids)


def test_lora_and_a_bottleneck_adapter_sum_as_each_alone() -> None:
    """Sum(lora, bottleneck): each acts at its own place (layers, sites); the base is run once."""
    model, ids = tiny_bert().eval(), token_ids()
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False), name="lora")
    dt.attach(model, dt.SeqBnConfig(), name="bn")
    perturb_site_adapters(model, seed=3, scale=0.1)
    both = outputs_of(model, ["lora", "bn"], ids)
    assert not torch.allclose(both, outputs_of(model, "lora", ids))
    assert not torch.allclose(both, outputs_of(model, "bn", ids))
    assert torch.equal(outputs_of(model, ["bn", "lora"], ids), both)


@pytest.mark.parametrize("bad", [dict(target_modules=["query"]), dict(output_adapter=False), dict(reduction_factor=0),
                                 dict(non_linearity="nope"), dict(scaling="huge"), dict(residual_before_ln="x")])
def test_bad_configs_are_named(bad: dict[str, object]) -> None:
    with pytest.raises(dt.ConfigError, match=f"BnConfig.{next(iter(bad))}" if "output_adapter" not in bad else "site"):
        dt.BnConfig(**bad)  # type: ignore[arg-type]


def test_unknown_architecture_is_refused_before_anything_changes() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="no adapter sites"):
        dt.attach(model, dt.SeqBnConfig())
    assert state_hash(model) == before


def test_site_blocks_live_under_a_name_the_library_treats_as_adapter_modules() -> None:
    from deltatune.layer import ADAPTER_PARTS
    from deltatune.sites import HOLDER

    assert HOLDER in ADAPTER_PARTS


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_parallel_gives_each_adapter_its_copy_of_the_batch(arch: str) -> None:
    model, ids = two_adapters(arch), token_ids(batch=2)
    a, b = outputs_of(model, "a", ids), outputs_of(model, "b", ids)
    both = outputs_of(model, dt.Parallel("a", "b"), ids)
    assert both.shape[0] == 4
    torch.testing.assert_close(both, torch.cat([a, b]), atol=1e-6, rtol=0)


def test_adamw_keeps_small_updates_of_an_adapter_over_a_bf16_base() -> None:
    """Over a bf16 base the adapter is fp32 (``layer.adapter_dtype``, the rule LoRA follows too), so AdamW's
    first step, ``lr * g / (|g| + eps)`` with lr = 1e-5, lands on every weight to one fp32 rounding (Adam's own
    arithmetic: a few roundings of the step). Stored in bf16, the base's dtype, most of those steps would round
    away: the last assertion shows that this lr is small enough for the test to catch bf16 parameters."""
    model, ids = tiny_bert().to(torch.bfloat16).train(), token_ids()
    dt.attach(model, dt.SeqBnConfig(reduction_factor=4))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    lr, eps, u32 = 1e-5, 1e-8, torch.finfo(torch.float32).eps / 2
    optimizer = torch.optim.AdamW(params.values(), lr=lr, eps=eps, weight_decay=0.0)
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16  # the activations return in the base's dtype
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 2])).backward()
    optimizer.step()
    kept_in_bf16 = total = 0
    for name, param in params.items():
        assert param.dtype == torch.float32 and param.grad is not None, name
        grad = param.grad.double()
        step = lr * grad / (grad.abs() + eps)
        now, expected = param.detach().double(), before[name].double() - step
        assert bool(((now - expected).abs() <= u32 * now.abs() + 16 * u32 * step.abs()).all()), name
        if name.endswith("weight"):
            start = before[name].to(torch.bfloat16)
            kept_in_bf16 += int(((start.double() - step).to(torch.bfloat16) == start)[grad != 0].sum())
            total += int((grad != 0).sum())
    assert total > 0 and kept_in_bf16 > total / 2


def test_a_bf16_base_saves_fp32_adapters_as_lora_does_and_loads_bf16_files_exactly(tmp_path: Path) -> None:
    """Both formats write the fp32 parameters, as a LoRA adapter over the same base (peft's convention); a folder
    written from bf16 modules (AdapterHub's, which follow ``model.to``) loads into fp32 parameters exactly."""
    def half() -> nn.Module:
        return tiny_bert().to(torch.bfloat16)

    def blocks(model: nn.Module) -> list[torch.Tensor]:
        return [p.detach() for n, p in sorted(model.named_parameters()) if "site_adapters" in n]

    def dtypes(file: Path) -> set[torch.dtype]:
        return {t.dtype for t in load_file(file).values()}
    model, ids = dt.attach(half(), dt.SeqBnConfig(reduction_factor=4)), token_ids()
    perturb_site_adapters(model, seed=3, scale=0.1)
    dt.save(model, tmp_path / "native")
    dt.save(model, tmp_path / "hub", format="adapters")
    dt.save(dt.attach(half(), dt.LoraConfig(target_modules=["query"])), tmp_path / "lora")
    assert dtypes(tmp_path / "lora/adapter_model.safetensors") == {torch.float32}
    assert dtypes(tmp_path / "native/adapter_model.safetensors") == dtypes(tmp_path / "hub/adapter.safetensors") == {torch.float32}
    for folder in ("native", "hub"):
        fresh = dt.load(half(), tmp_path / folder)
        assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(blocks(fresh), blocks(model), strict=True))
        assert torch.equal(outputs(fresh, ids), outputs(model, ids))
    model.to(torch.bfloat16)  # now bf16 modules, as AdapterHub's on a bf16 model
    dt.save(model, tmp_path / "bf16", format="adapters")
    assert dtypes(tmp_path / "bf16/adapter.safetensors") == {torch.bfloat16}
    loaded = blocks(dt.load(half(), tmp_path / "bf16"))
    assert all(a.dtype == torch.float32 and torch.equal(a, b.float()) for a, b in zip(loaded, blocks(model), strict=True))
