"""AdapterHub's on-disk format (adapters 1.3) and deltatune's key mapping onto it.

A saved adapter folder holds ``adapter_config.json`` and the weights of every site, keyed
``<site module path>.adapters.<name>.<AdapterHub key>``; ``BottleneckBlock.adapterhub_keys`` must
account for every key (and nothing more), and a folder written from BottleneckBlocks alone must load
into AdapterHub with identical outputs. Fusion folders use the FusionBlock's own key names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapters import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from adapters.composition import Fuse
from oracle_models import ATOL, block_from, build, hidden_size, inputs, perturb, probe_sites
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune.methods.bottleneck_block import BottleneckBlock

ADAPTER_CONFIG_KEYS = {"config", "hidden_size", "model_class", "model_name", "model_type", "name", "version"}
CONFIGS = {
    "houlsby_ln": lambda: DoubleSeqBnConfig(reduction_factor={"1": 2, "default": 4}, ln_before=True, ln_after=True,
                                            scaling="learned"),
    "gated": lambda: BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=8, non_linearity="relu",
                              use_gating=True, scaling="channel", leave_out=[0]),
    "parallel": lambda: ParBnConfig(mh_adapter=True),
    "pfeiffer": lambda: SeqBnConfig(),
}
ARCHS = ("bert", "distilbert", "gpt2", "llama", "qwen2", "t5")


def adapted(arch: str, config: BnConfig) -> nn.Module:
    model = build(arch)
    model.add_adapter("a", config=config)
    model.set_active_adapters("a")
    perturb(model)
    return model


def site_blocks(model: nn.Module, arch: str) -> dict[str, BottleneckBlock]:
    """Module path of each site's BottleneckLayer -> a BottleneckBlock copy of its adapter "a"."""
    paths = {id(module): path for path, module in model.named_modules()}
    blocks, probe = {}, probe_sites(model, arch)
    probe.close()  # only its site list is needed
    for record in probe.records:
        if "a" in record.adapter_layer.adapters:
            blocks[paths[id(record.adapter_layer)]] = block_from(
                record.adapter_layer.adapters["a"], model.adapters_config.get("a"), record.layer_idx, hidden_size(model))
    return blocks


def file_keys(blocks: dict[str, BottleneckBlock]) -> dict[str, Tensor]:
    """AdapterHub's file content for adapter "a", written from the blocks through their key mapping."""
    out = {}
    for path, block in blocks.items():
        state = block.state_dict()
        for ours, names in block.adapterhub_keys().items():
            for name in names:
                out[f"{path}.adapters.a.{name}"] = state[ours].detach().clone()
    return out


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_key_mapping_covers_a_saved_folder(tmp_path: Path, arch: str, config_name: str) -> None:
    config = CONFIGS[config_name]()
    model = adapted(arch, config)
    model.save_adapter(str(tmp_path), "a")
    assert {"adapter_config.json", "pytorch_adapter.bin"} <= {p.name for p in tmp_path.iterdir()}
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(meta) == ADAPTER_CONFIG_KEYS
    assert meta["config"] == config.to_dict() and meta["name"] == "a" and meta["version"] == "adapters.1.3.0"
    assert meta["model_class"] == type(model).__name__ and meta["hidden_size"] == hidden_size(model)
    saved = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    ours = file_keys(site_blocks(model, arch))
    assert sorted(saved) == sorted(ours)
    for key, value in saved.items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0)


def test_safetensors_names_and_the_ln_before_limit(tmp_path: Path) -> None:
    """``use_safetensors=True`` writes adapter.safetensors (and model_head.safetensors for a model with a
    head); AdapterHub itself cannot write an ln_before adapter that way (its layer norm sits under two keys)."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                           intermediate_size=64, vocab_size=128))
    import adapters

    adapters.init(model)
    model.add_adapter("a", config=SeqBnConfig())
    model.save_adapter(str(tmp_path / "bin"), "a")
    model.save_adapter(str(tmp_path / "safe"), "a", use_safetensors=True)
    assert {p.name for p in (tmp_path / "bin").iterdir()} == {"adapter_config.json", "pytorch_adapter.bin",
                                                              "head_config.json", "pytorch_model_head.bin"}
    assert {p.name for p in (tmp_path / "safe").iterdir()} == {"adapter_config.json", "adapter.safetensors",
                                                               "head_config.json", "model_head.safetensors"}
    assert sorted(load_file(tmp_path / "safe" / "model_head.safetensors")) == ["classifier.bias", "classifier.weight"]
    head = json.loads((tmp_path / "safe" / "head_config.json").read_text())
    assert head["config"] is None and head["num_labels"] == 2 and "label2id" in head
    model.add_adapter("n", config=SeqBnConfig(ln_before=True))
    with pytest.raises(RuntimeError, match="share memory"):
        model.save_adapter(str(tmp_path / "ln"), "n", use_safetensors=True)


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_folder_written_from_blocks_loads_into_adapterhub(tmp_path: Path, arch: str) -> None:
    """adapter_config.json + adapter.safetensors from BottleneckBlocks alone (ln_before included: both of
    its keys written) load into a fresh AdapterHub model, which then computes what the source model did."""
    config = CONFIGS["houlsby_ln"]()
    source = adapted(arch, config)
    with torch.no_grad():
        expected = source(**inputs(arch))[0]
    meta = {"config": config.to_dict(), "hidden_size": hidden_size(source), "model_class": type(source).__name__,
            "model_name": "", "model_type": source.config.model_type, "name": "a", "version": "adapters.1.3.0"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file(file_keys(site_blocks(source, arch)), str(tmp_path / "adapter.safetensors"))
    target = build(arch)
    info: dict[str, list[str]] = {}
    assert target.load_adapter(str(tmp_path), use_safetensors=True, loading_info=info) == "a"
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    target.set_active_adapters("a")
    with torch.no_grad():
        torch.testing.assert_close(target(**inputs(arch))[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_fusion_folder(tmp_path: Path, arch: str) -> None:
    """A fusion folder: adapter_fusion_config.json (with adapter_names) and the weights of every site's
    fusion layer, keyed ``<site module path>.adapter_fusion_layer.<fusion name>.<FusionBlock key>``."""
    from deltatune.methods.bottleneck_block import FusionBlock

    model = build(arch)
    for name in ("x", "y"):
        model.add_adapter(name, config=SeqBnConfig())
    model.add_adapter_fusion(Fuse("x", "y"), config="dynamic")
    model.save_adapter_fusion(str(tmp_path / "bin"), Fuse("x", "y"))
    model.save_adapter_fusion(str(tmp_path / "safe"), Fuse("x", "y"), use_safetensors=True)
    assert {p.name for p in (tmp_path / "bin").iterdir()} == {"adapter_fusion_config.json",
                                                              "pytorch_model_adapter_fusion.bin"}
    assert {p.name for p in (tmp_path / "safe").iterdir()} == {"adapter_fusion_config.json",
                                                               "model_adapter_fusion.safetensors"}
    meta = json.loads((tmp_path / "safe" / "adapter_fusion_config.json").read_text())
    assert set(meta) == ADAPTER_CONFIG_KEYS | {"adapter_names"}
    assert meta["adapter_names"] == ["x", "y"] and meta["name"] == "x,y"
    assert meta["config"] == {"key": True, "query": True, "value": True, "query_before_ln": False,
                              "regularization": True, "residual_before": False, "temperature": False,
                              "value_before_softmax": True, "value_initialized": True, "dropout_prob": None}
    saved = load_file(tmp_path / "safe" / "model_adapter_fusion.safetensors")
    paths = [path for path, module in model.named_modules() if "x,y" in getattr(module, "adapter_fusion_layer", {})]
    ours = FusionBlock(hidden_size(model)).state_dict()
    assert sorted(saved) == sorted(f"{p}.adapter_fusion_layer.x,y.{k}" for p in paths for k in ours)
    assert all(saved[f"{paths[0]}.adapter_fusion_layer.x,y.{k}"].shape == v.shape for k, v in ours.items())
