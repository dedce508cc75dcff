"""AdapterFusion over bottleneck adapters: attach, run, train, save and load (the numbers
themselves are checked against AdapterHub in tests/adapters_oracle/test_fusion_model_parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import outputs, perturb_site_adapters, state_hash, tiny_bert, tiny_llama, token_ids


def fused_model(make: object = tiny_bert, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = make().to(dtype).eval()  # type: ignore[operator]
    dt.attach(model, dt.SeqBnConfig(reduction_factor=4), name="a")
    dt.attach(model, dt.SeqBnConfig(reduction_factor=8), name="b")
    dt.attach(model, dt.FusionConfig(adapter_names=["a", "b"], dropout_prob=0.0), name="ab")
    perturb_site_adapters(model, seed=5, scale=0.1)
    return model


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_fuse_runs_and_only_the_fusion_trains(make: object) -> None:
    model, ids = fused_model(make), token_ids()
    with dt.disabled(model):
        base = outputs(model, ids)
    dt.set_active(model, dt.Fuse("a", "b"))
    fused = outputs(model, ids)
    assert not torch.allclose(fused, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".site_adapters.ab." in n for n in trainable)  # the members are frozen
    out = model(ids)[0]
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_save_and_load_give_the_same_fused_outputs(tmp_path: Path) -> None:
    model, ids = fused_model(), token_ids()
    dt.set_active(model, dt.Fuse("a", "b"))
    out = outputs(model, ids)
    dt.save(model, tmp_path / "saved")
    fresh = tiny_bert().eval()
    for name in ("a", "b", "ab"):
        dt.load(fresh, tmp_path / "saved" / name, name=name)
    dt.set_active(fresh, dt.Fuse("a", "b"))
    assert torch.equal(outputs(fresh, ids), out)


def test_fusion_needs_its_members_first_and_changes_nothing_otherwise() -> None:
    model = tiny_bert()
    dt.attach(model, dt.SeqBnConfig(), name="a")
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match=r"\['b'\] are not bottleneck adapters"):
        dt.attach(model, dt.FusionConfig(adapter_names=["a", "b"]), name="ab")
    assert state_hash(model) == before


def test_fuse_without_a_fusion_of_those_members_is_a_clear_error() -> None:
    model, ids = fused_model(), token_ids()
    dt.attach(model, dt.SeqBnConfig(), name="c")
    dt.set_active(model, dt.Fuse("a", "c"))
    with pytest.raises(dt.AdapterError, match="no fusion of exactly the adapters"):
        outputs(model, ids)


def test_merging_a_fusion_is_refused_and_deleting_it_restores_the_tree() -> None:
    model = fused_model()
    dt.set_active(model, dt.Fuse("a", "b"))
    with pytest.raises(dt.AdapterError, match="not a plain sum"):
        dt.unload(model, merge=True)
    dt.set_active(model, "a")
    with pytest.raises(dt.AdapterError, match="change activations"):
        dt.unload(model, merge=True)
    names = [n for n, _ in model.named_modules()]
    dt.delete_adapter(model, "ab")
    assert not any(".site_adapters.ab" in n for n, _ in model.named_modules())
    assert len([n for n, _ in model.named_modules()]) < len(names)


@pytest.mark.parametrize("bad", [dict(adapter_names=["a"]), dict(adapter_names=["a", "a"]), dict(dropout_prob=1.5)])
def test_bad_fusion_configs_are_named(bad: dict[str, object]) -> None:
    fields = {"adapter_names": ["a", "b"], **bad}
    with pytest.raises(dt.ConfigError, match=f"FusionConfig.{next(iter(bad))}"):
        dt.FusionConfig(**fields)  # type: ignore[arg-type]


def test_a_second_fusion_of_the_same_members_is_refused() -> None:
    model = fused_model()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="already fuses"):
        dt.attach(model, dt.FusionConfig(adapter_names=["a", "b"]), name="ab2")
    assert state_hash(model) == before


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_over_a_bf16_base_members_and_fusion_are_fp32_and_round_trip(make: object, tmp_path: Path) -> None:
    """The bottleneck rule (``layer.adapter_dtype``): fp32 parameters, activations back in bf16, fp32 gradients;
    both formats save the fp32 values and load them exactly."""
    model, ids = fused_model(make, torch.bfloat16), token_ids()
    dt.set_active(model, dt.Fuse("a", "b"))
    assert {p.dtype for n, p in model.named_parameters() if "site_adapters" in n} == {torch.float32}
    out = model(ids)[0]
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in grads)
    for fmt in ("peft", "adapters"):
        folder = tmp_path / fmt
        dt.save(model, folder, names=["a", "b", "ab"], format=fmt)  # a subfolder per adapter
        fresh = make().to(torch.bfloat16).eval()  # type: ignore[operator]
        for name in ("a", "b", "ab"):
            dt.load(fresh, folder / name, name=name)
        dt.set_active(fresh, dt.Fuse("a", "b"))
        assert {p.dtype for n, p in fresh.named_parameters() if "site_adapters" in n} == {torch.float32}
        assert torch.equal(outputs(fresh, ids), outputs(model, ids)), fmt
