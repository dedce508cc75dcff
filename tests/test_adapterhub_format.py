"""AdapterHub's folder layout for bottleneck adapters (``dt.save(..., format="adapters")`` / ``dt.load``), without
the oracle: round trips are exact, ``.bin`` files are read only with ``weights_only``, and every bad folder is
refused with the model left as it was. AdapterHub itself checks the files in tests/adapters_oracle."""

from __future__ import annotations

import json
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import outputs, perturb_site_adapters, state_hash, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.methods.bottleneck_hub import to_hub

MODELS: dict[str, Callable[[], nn.Module]] = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5}
CONFIGS: dict[str, Callable[[], dt.BnConfig]] = {
    "houlsby": lambda: dt.DoubleSeqBnConfig(reduction_factor=4),
    "pfeiffer": lambda: dt.SeqBnConfig(reduction_factor=4),
    "parallel": lambda: dt.ParBnConfig(mh_adapter=True, scaling="learned"),
    "custom": lambda: dt.BnConfig(mh_adapter=True, cross_adapter=True, reduction_factor={"1": 2, "default": 8},
                                  non_linearity="gelu_new", ln_before=True, ln_after=True, scaling="channel",
                                  use_gating=True, residual_before_ln=False, leave_out=(0,)),
}






def adapted(arch: str, config: str = "houlsby", name: str = "a") -> nn.Module:
    model = MODELS[arch]()
    dt.attach(model, CONFIGS[config](), name=name)
    perturb_site_adapters(model, seed=3, scale=0.3)
    return model


def structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def refused(folder: Path, match: str, arch: str = "bert") -> None:
    """``dt.load`` raises AdapterFileError matching ``match`` and leaves a model that has an adapter unchanged."""
    model = adapted(arch, "pfeiffer", name="other")
    before, modules, out = state_hash(model), structure(model), outputs(model)
    with pytest.raises(dt.AdapterFileError, match=match):
        dt.load(model, folder, name="a")
    assert state_hash(model) == before and structure(model) == modules and dt.adapter_names(model) == ["other"]
    assert torch.equal(outputs(model), out)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_round_trip_is_exact(tmp_path: Path, arch: str, config: str) -> None:
    model = adapted(arch, config)
    out = outputs(model)
    dt.save(model, tmp_path, format="adapters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(meta) == ["config", "hidden_size", "model_class", "model_name", "model_type", "name", "version"]
    assert meta["name"] == "a" and meta["version"].startswith("adapters.1.") and meta["model_class"] == type(model).__name__
    assert "architecture" not in meta["config"] and meta["config"]["phm_layer"] is False
    loaded = dt.load(MODELS[arch](), tmp_path, name="b")
    assert torch.equal(outputs(loaded), out)
    assert dt.active_adapters(loaded) == ("b",) and all(not p.requires_grad for p in loaded.parameters())


def test_ln_before_is_written_as_two_separate_equal_tensors(tmp_path: Path) -> None:
    model = adapted("llama", "custom")
    dt.save(model, tmp_path, format="adapters")
    saved = load_file(tmp_path / "adapter.safetensors")
    norms = sorted(k for k in saved if ".adapter_norm_before." in k)
    assert norms and all(torch.equal(saved[k], saved[k.replace("adapter_norm_before", "adapter_down.0")]) for k in norms)
    assert all(k.replace("adapter_norm_before", "adapter_down.1") in saved for k in norms)  # the Linear moves to .1
    assert all(k.startswith("model.layers.") and ".adapters.a." in k for k in saved)


def test_several_adapters_go_to_one_folder_each(tmp_path: Path) -> None:
    model = adapted("gpt2", "houlsby")
    dt.attach(model, CONFIGS["parallel"](), name="p")
    dt.save(model, tmp_path, format="adapters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "p"]
    for name in ("a", "p"):
        dt.set_active(model, name)
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["name"] == name
        assert torch.equal(outputs(dt.load(tiny_gpt2(), tmp_path / name, name=name)), outputs(model))


def test_pickled_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    """AdapterHub's default ``pytorch_adapter.bin``: a plain dict of tensors (torch.save) loads exactly."""
    model = adapted("bert", "custom")
    dt.save(model, tmp_path, format="adapters")
    torch.save(load_file(tmp_path / "adapter.safetensors"), tmp_path / "pytorch_adapter.bin")
    (tmp_path / "adapter.safetensors").unlink()
    assert torch.equal(outputs(dt.load(tiny_bert(), tmp_path, name="a")), outputs(model))


class Payload:
    """Unpickling this would create a file: the proof that a full unpickler ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("weights", ["pytorch_adapter.bin", "pytorch_model_head.bin"])
def test_a_bin_holding_code_is_refused_and_never_run(tmp_path: Path, weights: str) -> None:
    model = adapted("bert", "pfeiffer")
    dt.save(model, tmp_path, format="adapters")
    marker = tmp_path.parent / "unpickled"
    with open(tmp_path / weights, "wb") as f:
        pickle.dump({"w": Payload(marker)}, f, protocol=2)
    if weights == "pytorch_adapter.bin":
        (tmp_path / "adapter.safetensors").unlink()
    refused(tmp_path, r"weights_only=True.*use_safetensors=True")
    assert not marker.exists()


def test_a_bin_holding_no_tensor_dict_is_refused(tmp_path: Path) -> None:
    dt.save(adapted("bert", "pfeiffer"), tmp_path, format="adapters")
    (tmp_path / "adapter.safetensors").unlink()
    torch.save([torch.zeros(2)], tmp_path / "pytorch_adapter.bin")
    refused(tmp_path, "not a mapping of names to tensors")


def rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "adapter.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter.safetensors")


def edit_config(folder: Path, **fields: object) -> None:
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"].update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def first_key(tensors: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "extra key": (lambda f: rewrite(f, lambda t: t.update({"bert.pooler.dense.weight": torch.zeros(32, 32)})),
                  r"1 tensor\(s\) that the config does not account for"),
    "other adapter name": (lambda f: rewrite(f, lambda t: t.update(
        {k.replace(".adapters.a.", ".adapters.z."): t.pop(k) for k in list(t)})), r"name adapter\(s\) \['z'\]"),
    "missing key": (lambda f: rewrite(f, lambda t: t.pop(first_key(t, "adapter_up.bias"))), "missing tensor"),
    "wrong shape": (lambda f: rewrite(f, lambda t: t.update({first_key(t, "adapter_up.weight"): torch.zeros(32, 3)})),
                    r"has shape \(32, 3\) but the model needs \(32, 8\)"),
    "ln_before copies differ": (lambda f: rewrite(f, lambda t: t[first_key(t, "adapter_norm_before.weight")].add_(1)),
                                "two copies of one layer norm"),
    "duplicate with and without prefix": (lambda f: rewrite(f, lambda t: t.update(
        {k.removeprefix("bert."): v.clone() for k, v in list(t.items())[:1]})), "stored twice"),
    "lora": (lambda f: edit_config(f, architecture="lora"), r"AdapterHub 'lora' adapter; deltatune reads AdapterHub bottleneck"),
    "union": (lambda f: edit_config(f, architecture="union"), "'union' adapter"),
    "compacter": (lambda f: edit_config(f, phm_layer=True), "phm_layer=True .* Compacter"),
    "invertible": (lambda f: edit_config(f, inv_adapter="nice"), "inv_adapter='nice'"),
    "stochastic depth": (lambda f: edit_config(f, stochastic_depth=0.1), r"stochastic_depth=0.1 .*\"stochastic_depth\": 0.0"),
    "bad activation": (lambda f: edit_config(f, non_linearity="prelu"), "non_linearity='prelu' is invalid"),
    "required field missing": (lambda f: edit_config(f, reduction_factor=None) or _drop(f, "reduction_factor"),
                               r"lacks \['reduction_factor'\]"),
    "no weights": (lambda f: (f / "adapter.safetensors").unlink(), "neither adapter.safetensors nor pytorch_adapter.bin"),
    "corrupt safetensors": (lambda f: (f / "adapter.safetensors").write_bytes(b"junk"), "not a readable safetensors"),
}


def _drop(folder: Path, key: str) -> None:
    meta = json.loads((folder / "adapter_config.json").read_text())
    del meta["config"][key]
    (folder / "adapter_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_folders_are_refused_and_the_model_is_unchanged(tmp_path: Path, case: str) -> None:
    model = tiny_bert()
    dt.attach(model, dt.SeqBnConfig(reduction_factor=4, ln_before=True, mh_adapter=True), name="a")
    dt.save(model, tmp_path, format="adapters")
    damage, match = BAD_FILES[case]
    damage(tmp_path)
    refused(tmp_path, match)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_the_base_model_prefix_is_optional(tmp_path: Path, arch: str) -> None:
    """AdapterHub files of a bare model have no ``bert.`` / ``transformer.`` prefix: they load into the model with a
    head too (and files with it into the bare model: tests/adapters_oracle)."""
    model = adapted(arch, "custom")
    dt.save(model, tmp_path, format="adapters")
    prefix = model.base_model_prefix + "."
    rewrite(tmp_path, lambda t: t.update({k.removeprefix(prefix): t.pop(k) for k in list(t)}))
    assert not any(k.startswith(prefix) for k in load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(outputs(dt.load(MODELS[arch](), tmp_path, name="a")), outputs(model))


def test_legacy_config_without_version_renames_the_activation(tmp_path: Path) -> None:
    """adapter-transformers 2.x (no ``version``): "gelu" meant the tanh formula (gelu_new), as AdapterHub reads it."""
    model = tiny_llama()
    dt.attach(model, dt.SeqBnConfig(non_linearity="gelu_new"), name="a")
    perturb_site_adapters(model, seed=3, scale=0.3)
    dt.save(model, tmp_path, format="adapters")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    del meta["version"]
    meta["config"]["non_linearity"] = "gelu"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    assert torch.equal(outputs(dt.load(tiny_llama(), tmp_path, name="a")), outputs(model))


def test_a_trained_head_is_carried_by_the_adapter(tmp_path: Path) -> None:
    """With ``modules_to_save`` the classifier goes to head_config.json + model_head.safetensors; loading gives the
    adapter its own copy (the base head stays for ``dt.disabled``); another num_labels is refused."""
    model = tiny_bert()
    base = outputs(model)
    dt.attach(model, dt.SeqBnConfig(task_type="SEQ_CLS"), name="a")
    perturb_site_adapters(model, seed=3, scale=0.3)
    with torch.no_grad():
        model.classifier.copies["a"].weight.add_(1.0)
    out = outputs(model)
    dt.save(model, tmp_path, format="adapters")
    head = json.loads((tmp_path / "head_config.json").read_text())
    assert head["config"] is None and head["num_labels"] == 3 and head["model_class"] == "BertForSequenceClassification"
    assert sorted(load_file(tmp_path / "model_head.safetensors")) == ["classifier.bias", "classifier.weight"]
    loaded = dt.load(tiny_bert(), tmp_path, name="a")
    assert torch.equal(outputs(loaded), out)
    with dt.disabled(loaded):
        assert torch.equal(outputs(loaded), base)
    dt.delete_adapter(loaded, "a")
    assert state_hash(loaded) == state_hash(tiny_bert())
    with pytest.raises(dt.AdapterFileError, match="num_labels=3"):
        dt.load(tiny_bert(num_labels=2), tmp_path, name="a")


def test_a_head_equal_to_the_models_own_is_skipped(tmp_path: Path) -> None:
    """AdapterHub writes a causal LM's whole ``lm_head``: equal to the model's (same checkpoint), nothing is copied."""
    model = adapted("gpt2")
    dt.save(model, tmp_path, format="adapters")
    save_file({"lm_head.weight": model.lm_head.weight.detach().clone()}, tmp_path / "model_head.safetensors")
    (tmp_path / "head_config.json").write_text(json.dumps({"config": None, "model_class": "GPT2LMHeadModel"}))
    loaded = dt.load(tiny_gpt2(), tmp_path, name="a")
    assert torch.equal(outputs(loaded), outputs(model)) and "copies" not in str(structure(loaded))


def test_format_adapters_refuses_other_methods_before_writing(tmp_path: Path) -> None:
    model = adapted("llama")
    dt.attach(model, dt.LoraConfig(r=4), name="lo")
    with pytest.raises(dt.AdapterFileError, match=r"adapter 'lo' in AdapterHub's format: it is a LORA adapter \(LoraConfig\)"):
        dt.save(model, tmp_path / "out", format="adapters")
    assert not (tmp_path / "out").exists()
    with pytest.raises(dt.AdapterFileError, match=r"unknown adapter folder format 'adapterhub'; formats: \['peft', 'adapters'\]"):
        dt.save(model, tmp_path / "out", names=["a"], format="adapterhub")


def test_leftover_files_that_a_reader_would_take_are_refused(tmp_path: Path) -> None:
    model = adapted("bert")
    (tmp_path / "pytorch_adapter.bin").write_bytes(b"old")
    with pytest.raises(dt.AdapterFileError, match=r"\['pytorch_adapter.bin'\] from another save"):
        dt.save(model, tmp_path, format="adapters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_adapter.bin"]


def test_peft_stays_the_default(tmp_path: Path) -> None:
    model = adapted("bert")
    dt.save(model, tmp_path, names=["a"])
    assert "peft_type" in json.loads((tmp_path / "a" / "adapter_config.json").read_text())


def test_a_preset_name_unknown_keys_and_a_legacy_invertible_entry_read_as_adapterhub_reads_them(tmp_path: Path) -> None:
    """An old file may store a preset name instead of the dict; unknown keys are ignored with one warning; a
    legacy task adapter ("type": "text_task") that declares an invertible adapter but saved none loads without it."""
    model = tiny_gpt2()
    dt.attach(model, dt.DoubleSeqBnConfig(), name="a")
    perturb_site_adapters(model, seed=3, scale=0.3)
    dt.save(model, tmp_path, format="adapters")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["config"] = "houlsby"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    assert torch.equal(outputs(dt.load(tiny_gpt2(), tmp_path, name="a")), outputs(model))
    meta["config"] = {**to_hub(dt.DoubleSeqBnConfig()), "inv_adapter": "nice", "future_field": 1}
    meta["type"] = "text_task"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"ignoring keys unknown .*\['future_field'\]"):
        assert torch.equal(outputs(dt.load(tiny_gpt2(), tmp_path, name="a")), outputs(model))


def test_copies_inside_the_base_model_are_not_written_where_adapterhub_would_drop_them(tmp_path: Path) -> None:
    model = tiny_bert()
    dt.attach(model, dt.SeqBnConfig(modules_to_save=("classifier", "pooler")), name="a")
    with pytest.raises(dt.AdapterFileError, match=r"copies of \['bert.pooler'\] .* lie inside the base model"):
        dt.save(model, tmp_path / "out", format="adapters")
    assert not (tmp_path / "out").exists()
