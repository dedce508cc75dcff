"""AdapterFusion folders both ways: what ``adapters`` 1.3's ``save_adapter_fusion`` writes, ``dt.load`` reads (after
the members, from ``save_adapter``); what ``dt.save(..., format="adapters")`` writes, AdapterHub's
``load_adapter_fusion`` reads; outputs under ``Fuse("a", "b")`` agree at max abs diff <= 1e-5 (fp32, rtol=0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import adapters
import pytest
import torch
from adapters.composition import Fuse
from oracle_models import ATOL, build, perturb
from safetensors.torch import load_file
from test_format_interchange import load_quietly, output, randomize

import deltatune as dt

ARCHS = ("bert", "gpt2", "llama", "t5")
MEMBERS: dict[str, tuple[Any, dt.BnConfig]] = {
    "a": (adapters.SeqBnConfig(reduction_factor=4, mh_adapter=True), dt.SeqBnConfig(reduction_factor=4, mh_adapter=True)),
    "b": (adapters.SeqBnConfig(reduction_factor=8, mh_adapter=True, non_linearity="tanh", ln_after=True),
          dt.SeqBnConfig(reduction_factor=8, mh_adapter=True, non_linearity="tanh", ln_after=True)),
}
CUSTOM = {"key": True, "query": True, "value": True, "query_before_ln": True, "regularization": False,
          "residual_before": True, "temperature": True, "value_before_softmax": False, "value_initialized": False,
          "dropout_prob": 0.0}
FUSIONS: dict[str, tuple[Any, dt.FusionConfig]] = {
    "dynamic": ("dynamic", dt.FusionConfig(adapter_names=["a", "b"])),
    "static": ("static", dt.StaticFusionConfig(adapter_names=["a", "b"])),
    "custom": (CUSTOM, dt.FusionConfig(adapter_names=["a", "b"], **CUSTOM)),  # type: ignore[arg-type]
}
CASES = [(arch, fusion, True) for arch in ARCHS for fusion in FUSIONS] + [(arch, "dynamic", False) for arch in ARCHS]


@pytest.mark.parametrize(("arch", "fusion", "safetensors"), CASES)
def test_fusion_saved_by_adapterhub_loads_in_deltatune(tmp_path: Path, arch: str, fusion: str, safetensors: bool) -> None:
    theirs = build(arch)
    for name, (config, _) in MEMBERS.items():
        theirs.add_adapter(name, config=config)
    theirs.add_adapter_fusion(Fuse("a", "b"), config=FUSIONS[fusion][0])
    perturb(theirs)
    theirs.set_active_adapters(Fuse("a", "b"))
    expected = output(theirs, arch)
    theirs.set_active_adapters(None)
    plain = output(theirs, arch)
    for name in MEMBERS:
        theirs.save_adapter(str(tmp_path / name), name, use_safetensors=safetensors)
    theirs.save_adapter_fusion(str(tmp_path / "fusion"), Fuse("a", "b"), use_safetensors=safetensors)
    ours = build(arch, init_adapters=False)
    for name in MEMBERS:
        load_quietly(ours, tmp_path / name, name)
    with pytest.raises(dt.AdapterError, match="joined by .,., which no deltatune name"):  # hence the default below
        dt.load(ours, tmp_path / "fusion", name="a,b")
    load_quietly(ours, tmp_path / "fusion", name="default")  # dt.load's default: the members joined by "_"
    assert dt.adapter_names(ours) == ["a", "b", "a_b"]
    dt.set_active(ours, dt.Fuse("a", "b"))
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(output(ours, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("arch", ARCHS)
def test_fusion_saved_by_deltatune_loads_in_adapterhub(tmp_path: Path, arch: str, fusion: str) -> None:
    ours = build(arch, init_adapters=False)
    plain = output(ours, arch)
    for name, (_, config) in MEMBERS.items():
        dt.attach(ours, config, name=name)
    dt.attach(ours, FUSIONS[fusion][1], name="ab")
    randomize(ours)
    dt.set_active(ours, dt.Fuse("a", "b"))
    expected = output(ours, arch)
    assert (expected - plain).abs().max() > 1e-3
    dt.save(ours, tmp_path, names=["a", "b", "ab"], format="adapters")
    theirs = build(arch)
    for name in MEMBERS:
        info: dict[str, list[str]] = {}
        assert theirs.load_adapter(str(tmp_path / name), use_safetensors=True, loading_info=info) == name
        assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    theirs.load_adapter_fusion(str(tmp_path / "ab"), use_safetensors=True)  # returns None on models with a head
    assert list(theirs.adapters_config.fusions) == ["a,b"]
    written = load_file(tmp_path / "ab" / "model_adapter_fusion.safetensors")
    state = {k: v for k, v in theirs.state_dict().items() if ".adapter_fusion_layer." in k}
    assert sorted(state) == sorted(written)  # every fusion tensor of theirs came from the file
    assert all(torch.equal(state[k], written[k]) for k in written)
    theirs.set_active_adapters(Fuse("a", "b"))
    torch.testing.assert_close(output(theirs, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_fusion_config_json_and_keys_equal_adapterhubs(tmp_path: Path, arch: str, fusion: str) -> None:
    theirs = build(arch)
    for name, (config, _) in MEMBERS.items():
        theirs.add_adapter(name, config=config)
    theirs.add_adapter_fusion(Fuse("a", "b"), config=FUSIONS[fusion][0])
    theirs.save_adapter_fusion(str(tmp_path / "theirs"), Fuse("a", "b"), use_safetensors=True)
    ours = build(arch, init_adapters=False)
    for name, (_, config) in MEMBERS.items():
        dt.attach(ours, config, name=name)
    dt.attach(ours, FUSIONS[fusion][1], name="ab")
    dt.save(ours, tmp_path / "ours", names=["ab"], format="adapters")
    name = "adapter_fusion_config.json"
    assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "theirs" / name).read_text())
    mine = load_file(tmp_path / "ours" / "model_adapter_fusion.safetensors")
    their_keys = load_file(tmp_path / "theirs" / "model_adapter_fusion.safetensors")
    assert sorted(mine) == sorted(their_keys) and all(mine[k].shape == their_keys[k].shape for k in mine)
