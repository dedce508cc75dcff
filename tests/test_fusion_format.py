"""AdapterFusion in AdapterHub's folder layout (``dt.save(..., format="adapters")`` / ``dt.load``), without the
oracle: exact round trips under ``dt.Fuse``, strict refusals with the model unchanged, ``.bin`` files read only with
``weights_only``. AdapterHub itself reads and writes these folders in tests/adapters_oracle/test_fusion_interchange.py."""

from __future__ import annotations

import json
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import outputs, perturb_site_adapters, state_hash, tiny_bert, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.state import STATE_ATTR, state_of

MODELS: dict[str, Callable[[], nn.Module]] = {"bert": tiny_bert, "llama": tiny_llama}
FUSIONS: dict[str, Callable[[], dt.FusionConfig]] = {
    "dynamic": lambda: dt.FusionConfig(adapter_names=["a", "b"], dropout_prob=0.0),
    "static": lambda: dt.StaticFusionConfig(adapter_names=["a", "b"]),
    "custom": lambda: dt.FusionConfig(adapter_names=["a", "b"], query_before_ln=True, residual_before=True,
                                      value_before_softmax=False, value_initialized=False, regularization=False),
}
FUSION_JSON, FUSION_SAFE, FUSION_BIN = "adapter_fusion_config.json", "model_adapter_fusion.safetensors", \
    "pytorch_model_adapter_fusion.bin"






def members(arch: str = "bert") -> nn.Module:
    model = MODELS[arch]().eval()
    dt.attach(model, dt.SeqBnConfig(reduction_factor=4), name="a")
    dt.attach(model, dt.SeqBnConfig(reduction_factor=8), name="b")
    return model


def fused(arch: str = "bert", fusion: str = "dynamic", name: str = "ab") -> nn.Module:
    model = members(arch)
    dt.attach(model, FUSIONS[fusion](), name=name)
    perturb_site_adapters(model, seed=5, scale=0.1)
    dt.set_active(model, dt.Fuse("a", "b"))
    return model


def saved(tmp_path: Path, arch: str = "bert") -> tuple[nn.Module, Path]:
    """A fused model, and the AdapterHub folders of its members ("a", "b") and fusion ("ab") under ``tmp_path``."""
    model = fused(arch)
    dt.save(model, tmp_path, names=["a", "b", "ab"], format="adapters")
    return model, tmp_path


def loaded_members(root: Path, arch: str = "bert") -> nn.Module:
    model = MODELS[arch]().eval()
    for member in ("a", "b"):
        dt.load(model, root / member, name=member)
    return model


def structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def refused(model: nn.Module, folder: Path, match: str, **kwargs: str) -> None:
    """``dt.load`` raises AdapterFileError matching ``match`` and leaves ``model`` as it was."""
    names = dt.adapter_names(model) if STATE_ATTR in model.__dict__ else None
    before, modules, out = state_hash(model), structure(model), outputs(model)
    with pytest.raises(dt.AdapterFileError, match=match):
        dt.load(model, folder, **kwargs)
    assert (dt.adapter_names(model) if STATE_ATTR in model.__dict__ else None) == names
    assert state_hash(model) == before and structure(model) == modules
    assert torch.equal(outputs(model), out)


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_round_trip_through_adapterhub_folders_is_exact(tmp_path: Path, arch: str, fusion: str) -> None:
    model = fused(arch, fusion)
    expected = outputs(model)
    with dt.disabled(model):
        assert not torch.allclose(outputs(model), expected)
    dt.save(model, tmp_path, names=["a", "b", "ab"], format="adapters")
    data = json.loads((tmp_path / "ab" / FUSION_JSON).read_text())
    assert data["name"] == "a,b" and data["adapter_names"] == ["a", "b"] and data["version"] == "adapters.1.3.0"
    assert all(".adapter_fusion_layer.a,b." in k for k in load_file(tmp_path / "ab" / FUSION_SAFE))
    fresh = loaded_members(tmp_path, arch)
    dt.load(fresh, tmp_path / "ab")  # default name: the members joined by "_"
    assert dt.adapter_names(fresh) == ["a", "b", "a_b"]
    assert state_of(fresh).configs["a_b"] == FUSIONS[fusion]().replace(inference_mode=True)
    dt.set_active(fresh, dt.Fuse("a", "b"))
    assert torch.equal(outputs(fresh), expected)


def test_name_overrides_the_default_and_the_peft_layout_round_trips_too(tmp_path: Path) -> None:
    model, root = saved(tmp_path / "hub")
    expected = outputs(model)
    fresh = loaded_members(root)
    dt.load(fresh, root / "ab", name="mix")
    assert dt.adapter_names(fresh) == ["a", "b", "mix"]
    dt.set_active(fresh, dt.Fuse("a", "b"))
    assert torch.equal(outputs(fresh), expected)
    dt.save(model, tmp_path / "peft")  # deltatune's own layout (the default)
    again = tiny_bert().eval()
    for name in ("a", "b", "ab"):
        dt.load(again, tmp_path / "peft" / name, name=name)
    dt.set_active(again, dt.Fuse("a", "b"))
    assert torch.equal(outputs(again), expected)


def test_a_single_fusion_goes_in_the_folder_itself(tmp_path: Path) -> None:
    dt.save(fused(), tmp_path, names=["ab"], format="adapters")
    assert sorted(p.name for p in tmp_path.iterdir()) == [FUSION_JSON, FUSION_SAFE]


def test_missing_members_are_named_and_the_model_is_unchanged(tmp_path: Path) -> None:
    _, root = saved(tmp_path)
    model = tiny_bert().eval()
    dt.load(model, root / "a", name="a")
    refused(model, root / "ab", r"\['b'\] are not bottleneck adapters.*load each member first")
    refused(tiny_bert().eval(), root / "ab", r"\['a', 'b'\] are not bottleneck adapters")


def test_a_pickled_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    model, root = saved(tmp_path)
    expected = outputs(model)
    torch.save(load_file(root / "ab" / FUSION_SAFE), root / "ab" / FUSION_BIN)
    (root / "ab" / FUSION_SAFE).unlink()
    fresh = loaded_members(root)
    dt.load(fresh, root / "ab")
    dt.set_active(fresh, dt.Fuse("a", "b"))
    assert torch.equal(outputs(fresh), expected)


class Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def test_a_bin_holding_an_arbitrary_object_is_refused_and_never_run(tmp_path: Path) -> None:
    _, root = saved(tmp_path / "s")
    marker = tmp_path / "unpickled"
    with open(root / "ab" / FUSION_BIN, "wb") as f:
        pickle.dump({"w": Payload(marker)}, f, protocol=2)
    (root / "ab" / FUSION_SAFE).unlink()
    refused(loaded_members(root), root / "ab", r"weights_only=True")
    assert not marker.exists()


def _edit_json(folder: Path, **fields: object) -> None:
    data = json.loads((folder / FUSION_JSON).read_text())
    data.update(fields)
    (folder / FUSION_JSON).write_text(json.dumps(data))


def _edit_config(folder: Path, **fields: object) -> None:
    data = json.loads((folder / FUSION_JSON).read_text())
    data["config"].update(fields)
    (folder / FUSION_JSON).write_text(json.dumps(data))


def _rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / FUSION_SAFE)
    change(tensors)
    save_file(tensors, folder / FUSION_SAFE)


def _first(tensors: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


BAD: dict[str, tuple[Callable[[Path], None], str]] = {
    "extra key": (lambda f: _rewrite(f, lambda t: t.update({"bert.encoder.layer.0.output.adapter_fusion_layer.a,b.x":
                                                           torch.zeros(1)})), "does not account for"),
    "missing key": (lambda f: _rewrite(f, lambda t: t.pop(_first(t, "query.weight"))), "missing tensor"),
    "wrong shape": (lambda f: _rewrite(f, lambda t: t.update({_first(t, "key.bias"): torch.zeros(3)})),
                    r"has shape \(3,\) but the model needs \(32,\)"),
    "other fusion name": (lambda f: _edit_json(f, name="x,y"), r"The keys name fusion\(s\) \['a,b'\]"),
    "config mismatch (static preset vs value weights)": (lambda f: _edit_json(f, config="static"), "does not account for"),
    "missing field": (lambda f: _edit_json(f, config={"key": True}), "lacks"),
    "non-bool flag": (lambda f: _edit_config(f, query="yes"), "query='yes' must be true or false"),
    "bad members": (lambda f: _edit_json(f, adapter_names=["a"]), "two or more distinct"),
    "no weights": (lambda f: (f / FUSION_SAFE).unlink(), "has neither"),
    "broken json": (lambda f: (f / FUSION_JSON).write_text("{"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fusion_folders_are_refused_and_the_model_is_unchanged(tmp_path: Path, case: str) -> None:
    _, root = saved(tmp_path)
    change, match = BAD[case]
    change(root / "ab")
    refused(loaded_members(root), root / "ab", match)


def test_stale_files_a_reader_would_take_are_refused_before_writing(tmp_path: Path) -> None:
    model = fused()
    for stale in (FUSION_BIN, "adapter_config.json"):
        folder = tmp_path / stale
        folder.mkdir()
        (folder / stale).write_text("old")
        with pytest.raises(dt.AdapterFileError, match="Nothing was written"):
            dt.save(model, folder, names=["ab"], format="adapters")
        assert sorted(p.name for p in folder.iterdir()) == [stale]


def test_loaded_blocks_follow_the_models_mode(tmp_path: Path) -> None:
    """A fusion's dropout (BERT's attention dropout by default) stays off in a model loaded in eval mode."""
    _, root = saved(tmp_path)
    model = loaded_members(root)
    dt.load(model, root / "ab")
    blocks = [m for n, m in model.named_modules() if ".site_adapters." in n]
    assert blocks and not any(m.training for b in blocks for m in b.modules())
    training = tiny_bert().train()
    dt.attach(training, dt.SeqBnConfig(), name="a")
    assert all(m.training for n, m in training.named_modules() if "site_adapters" in n)
