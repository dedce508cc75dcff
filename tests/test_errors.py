"""Errors say what, where and how to fix it, and a failure leaves the model exactly as it was.

Covers principle 7 (unmatched or unadaptable targets, bad adapter files) and principle 5
(safetensors only: nothing from an adapter folder is ever unpickled), plus atomic saves.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
import deltatune.io as dtio
from conftest import close, state_hash, tiny_bert, tiny_llama, token_ids

PREFIX = "base_model.model."
Q0_A = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"


# ----------------------------------------------------------------------------- helpers


def snapshot(model: nn.Module) -> tuple[str, list[tuple[str, type]], dict[str, bool], Any]:
    """Everything a failed call must leave alone: tensors, module types, trainable flags, adapter state."""
    state = model.__dict__.get("deltatune_state")
    bookkeeping = None if state is None else (dict(state.configs), tuple(state.active))
    return (state_hash(model), [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()}, bookkeeping)


def lora(**fields: Any) -> dt.LoraConfig:
    return dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                            "init_lora_weights": False, **fields})


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A peft-format folder with a rank-4 LoRA on q_proj / v_proj of tiny_llama (non-zero B)."""
    model = tiny_llama()
    dt.attach(model, lora())
    folder = tmp_path / "adapter"
    dt.save(model, folder)
    return folder


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


@functools.cache
def _other_adapter_template() -> tuple[nn.Module, torch.Tensor]:
    model = tiny_llama(seed=3)
    dt.attach(model, lora(target_modules=["k_proj", "o_proj", "q_proj"]), name="other")
    with torch.no_grad():
        out = model(token_ids()).logits
    return model, out


def model_with_other_adapter() -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy of tiny_llama carrying an active adapter "other" that changes the output; and that output."""
    model, out = _other_adapter_template()
    return copy.deepcopy(model), out


def assert_load_fails_cleanly(folder: Path, error: type[Exception], *needles: str, name: str = "default") -> str:
    """Loading ``folder`` raises ``error`` mentioning every needle, on a bare model and on one with an adapter."""
    bare = tiny_llama(seed=3)
    before = snapshot(bare)
    with pytest.raises(error) as info:
        dt.load(bare, folder, name=name)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert snapshot(bare) == before
    assert "deltatune_state" not in bare.__dict__

    busy, out = model_with_other_adapter()
    before = snapshot(busy)
    with pytest.raises(error):
        dt.load(busy, folder, name=name)
    assert snapshot(busy) == before
    assert dt.adapter_names(busy) == ["other"]
    with torch.no_grad():
        assert torch.equal(busy(token_ids()).logits, out)  # the other adapter behaves exactly as before
    return message


# ----------------------------------------------------------------------------- attach: targets


@pytest.mark.parametrize(("targets", "suggested"), [
    (["q_projj"], "q_proj"),
    (["qproj", "vproj"], "q_proj"),
    (["self_atn.o_proj"], "o_proj"),
    (r".*\.q_projj", "q_proj"),
    (["mlp.gate"], "gate_proj"),
])
def test_unmatched_target_lists_close_names_and_layer_types(targets: Any, suggested: str) -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.TargetError) as info:
        dt.attach(model, lora(target_modules=targets))
    message = str(info.value)
    assert suggested in message
    assert "Linear" in message and "Embedding" in message  # the adaptable layer types present
    assert "matched no" in message and repr(targets if isinstance(targets, str) else tuple(targets)) in message
    assert snapshot(model) == before
    assert "deltatune_state" not in model.__dict__


def test_unmatched_layers_to_transform_says_so() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match="selected layers") as info:
        dt.attach(model, lora(target_modules=["q_proj"], layers_to_transform=[7]))
    assert "q_proj" in str(info.value)
    assert snapshot(model) == before


@pytest.mark.parametrize(("targets", "named", "kind"), [
    (["input_layernorm"], "model.layers.0.input_layernorm", "LlamaRMSNorm"),
    (["self_attn"], "model.layers.0.self_attn", "LlamaAttention"),
    (["q_proj", "mlp"], "model.layers.0.mlp", "LlamaMLP"),
    (r"model\.layers\.1\.mlp\..*", "model.layers.1.mlp.act_fn", "SiLU"),
    (["model.norm"], "model.norm", "LlamaRMSNorm"),
])
def test_unadaptable_target_is_named(targets: Any, named: str, kind: str) -> None:
    import peft
    with pytest.raises(ValueError, match="not supported"):  # peft refuses these too
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=targets))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.TargetError) as info:
        dt.attach(model, lora(target_modules=targets))
    message = str(info.value)
    assert repr(named) in message and kind in message and "Fix:" in message
    assert snapshot(model) == before
    assert "deltatune_state" not in model.__dict__


def test_failed_second_attach_leaves_first_adapter_alone() -> None:
    model, out = model_with_other_adapter()
    before = snapshot(model)
    for bad in (lora(target_modules=["q_projj"]), lora(target_modules=["self_attn"]),
                lora(target_modules=["q_proj"], modules_to_save=["no_such_head"])):
        with pytest.raises(dt.TargetError):
            dt.attach(model, bad, name="second")
        assert snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(token_ids()).logits, out)


def test_unmatched_modules_to_save_lists_close_names() -> None:
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match="modules_to_save") as info:
        dt.attach(model, lora(target_modules=["query"], modules_to_save=["clasifier"]))
    assert "classifier" in str(info.value)
    assert snapshot(model) == before


BAD_NAMES = ["a.b", "", 3, "training", "forward", "to", "cuda", "state_dict", "/some/where", "a/b", "..",
             "a\nb", "a b", "-x", "a\\b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_adapter_name(name: Any) -> None:
    """Names that shadow nn.Module attributes, or that would make a save write outside its folder,
    are refused before anything changes (they used to leave an empty wrapper behind)."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.AdapterError, match="name"):
        dt.attach(model, lora(), name=name)
    assert snapshot(model) == before
    assert not any("base_layer" in key for key in model.state_dict())


@pytest.mark.parametrize("name", ["training", "/some/where", "a\nb"])
def test_invalid_name_on_load_changes_nothing(adapter_dir: Path, name: str) -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(dt.AdapterError, match="name"):
        dt.load(model, adapter_dir, name=name)
    assert snapshot(model) == before


@pytest.mark.parametrize("name", ["default", "task-b", "lang_en", "v2", "日本語"])
def test_valid_names_save_inside_the_folder(tmp_path: Path, name: str) -> None:
    model = tiny_llama()
    dt.attach(model, lora(), name=name)
    dt.save(model, tmp_path / "out")
    written = [p for p in tmp_path.rglob("adapter_config.json")]
    assert len(written) == 1 and written[0].is_relative_to(tmp_path / "out")


def test_attach_under_a_taken_name() -> None:
    model, out = model_with_other_adapter()
    before = snapshot(model)
    with pytest.raises(dt.AdapterError, match="'other'.*already"):
        dt.attach(model, lora(), name="other")
    assert snapshot(model) == before


# ----------------------------------------------------------------------------- load: shapes and keys


def test_good_folder_loads(adapter_dir: Path) -> None:
    """The baseline the failure tests edit: it loads, on a bare model and next to another adapter."""
    busy, _ = model_with_other_adapter()
    dt.load(busy, adapter_dir, name="x")
    assert dt.adapter_names(busy) == ["other", "x"]
    dt.load(tiny_llama(seed=3), adapter_dir)


def test_tensor_of_wrong_shape_names_key_and_both_shapes(adapter_dir: Path) -> None:
    edit_tensors(adapter_dir, lambda t: t.__setitem__(Q0_A, t[Q0_A][:3].clone()))
    message = assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, Q0_A, "(3, 32)", "(4, 32)")
    assert "unchanged" in message


def test_config_rank_differs_from_file(adapter_dir: Path) -> None:
    edit_config(adapter_dir, r=8)
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "(4, 32)", "(8, 32)", "lora_A.weight")


def test_rank_pattern_differs_from_file(adapter_dir: Path) -> None:
    edit_config(adapter_dir, rank_pattern={"v_proj": 2})
    message = assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "v_proj", "(4, 32)", "(2, 32)")
    assert "q_proj" not in message.split("has shape")[0]  # the key named is a v_proj one


def test_unexpected_extra_key_is_named(adapter_dir: Path) -> None:
    extra = f"{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"
    edit_tensors(adapter_dir, lambda t: t.__setitem__(extra, torch.zeros(4, 32)))
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, extra)


def test_key_outside_peft_prefix_is_named(adapter_dir: Path) -> None:
    edit_tensors(adapter_dir, lambda t: t.__setitem__("something.else", torch.zeros(2)))
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "something.else")


def test_missing_key_is_named(adapter_dir: Path) -> None:
    edit_tensors(adapter_dir, lambda t: t.pop(Q0_B))
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, Q0_B, "missing")


def test_config_targets_more_than_file_holds(adapter_dir: Path) -> None:
    edit_config(adapter_dir, target_modules=["q_proj", "v_proj", "k_proj"])
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "missing", "k_proj")


# ----------------------------------------------------------------------------- load: corrupt files


def _truncate_half(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated-half": _truncate_half,
    "truncated-header": lambda raw: raw[:100],
    "truncated-4-bytes": lambda raw: raw[:4],
    "empty": lambda raw: b"",
    "random-bytes": lambda raw: random.Random(0).randbytes(len(raw)),
    "small-header-random-json": lambda raw: (40).to_bytes(8, "little") + random.Random(1).randbytes(200),
    "header-not-json": lambda raw: (12).to_bytes(8, "little") + b"{not json!!}" + raw[20:],
    "header-too-long": lambda raw: (10**9).to_bytes(8, "little") + raw[8:],
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_safetensors(adapter_dir: Path, corrupt: str) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(CORRUPTIONS[corrupt](path.read_bytes()))
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "adapter_model.safetensors")


CONFIG_CORRUPTIONS: dict[str, bytes] = {
    "truncated": b'{"peft_type": "LORA", "r": 4, "target_mod',
    "empty": b"",
    "not-utf8": b'{"peft_type": "LORA", "r": \xff\xfe}',
    "a-list": b'["LORA"]',
    "null": b"null",
    "no-peft-type": b'{"r": 4, "target_modules": ["q_proj"]}',
}


@pytest.mark.parametrize("corrupt", list(CONFIG_CORRUPTIONS), ids=list(CONFIG_CORRUPTIONS))
def test_corrupt_config_json(adapter_dir: Path, corrupt: str) -> None:
    (adapter_dir / "adapter_config.json").write_bytes(CONFIG_CORRUPTIONS[corrupt])
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "adapter_config.json")


def test_invalid_value_in_config_json_names_the_field(adapter_dir: Path) -> None:
    """A well-formed file with a bad value fails config validation (a ConfigError, still a DeltatuneError)."""
    edit_config(adapter_dir, r=0)
    assert_load_fails_cleanly(adapter_dir, dt.DeltatuneError, "r=0", "Fix:")


@pytest.mark.parametrize("peft_type", ["LOHA", "NOT_A_METHOD"])  # LOHA: a peft method deltatune lacks
def test_unsupported_peft_type_is_named(adapter_dir: Path, peft_type: str) -> None:
    edit_config(adapter_dir, peft_type=peft_type)
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, repr(peft_type), "LORA")


@pytest.mark.parametrize(("key", "value"), [("use_bdlora", True), ("layer_replication", [[0, 1]])])
def test_unsupported_peft_feature_in_file_is_named(adapter_dir: Path, key: str, value: Any) -> None:
    edit_config(adapter_dir, **{key: value})
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, key)


# ----------------------------------------------------------------------------- load: pickle is never read


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything calls the pickle loaders while the test runs."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an adapter file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_payload_is_live(tmp_path: Path) -> None:
    """The malicious payload used below really does create its marker when unpickled."""
    marker = tmp_path / "sanity-marker"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("file_name", ["adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"])
def test_pickle_weights_are_refused_and_never_unpickled(adapter_dir: Path, tmp_path: Path, file_name: str,
                                                        no_unpickling: None) -> None:
    marker = tmp_path / "pwned"
    (adapter_dir / "adapter_model.safetensors").unlink()
    with open(adapter_dir / file_name, "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    message = assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "pickle", file_name, "safetensors")
    assert not marker.exists()
    assert "Fix:" in message


def test_torch_saved_dict_is_refused(adapter_dir: Path) -> None:
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")  # a benign, valid peft .bin: refused all the same
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "pickle")


def test_pickle_beside_safetensors_is_ignored(adapter_dir: Path, tmp_path: Path, no_unpickling: None) -> None:
    marker = tmp_path / "pwned"
    with open(adapter_dir / "adapter_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)
    dt.load(tiny_llama(), adapter_dir)
    assert not marker.exists()


def test_folder_with_only_a_pickle(tmp_path: Path, no_unpickling: None) -> None:
    folder = tmp_path / "only-bin"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)
    assert_load_fails_cleanly(folder, dt.AdapterFileError, "adapter_config.json", "adapter_model.bin")
    assert not marker.exists()


# ----------------------------------------------------------------------------- load: folders and names


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "adapter"
    assert_load_fails_cleanly(missing, dt.AdapterFileError, str(missing), "not a folder")


def test_a_file_instead_of_a_folder(adapter_dir: Path) -> None:
    assert_load_fails_cleanly(adapter_dir / "adapter_config.json", dt.AdapterFileError, "not a folder")


def test_empty_folder(tmp_path: Path) -> None:
    assert_load_fails_cleanly(tmp_path, dt.AdapterFileError, "adapter_config.json", str(tmp_path))


def test_config_without_weights(adapter_dir: Path) -> None:
    (adapter_dir / "adapter_model.safetensors").unlink()
    assert_load_fails_cleanly(adapter_dir, dt.AdapterFileError, "adapter_model.safetensors")


def test_load_under_a_taken_name(adapter_dir: Path) -> None:
    model, out = model_with_other_adapter()
    before = snapshot(model)
    with pytest.raises(dt.AdapterError, match="other"):
        dt.load(model, adapter_dir, name="other")
    assert snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(token_ids()).logits, out)
    dt.load(model, adapter_dir, name="fresh")  # the model is still fine for a good load
    assert dt.adapter_names(model) == ["other", "fresh"]


# ----------------------------------------------------------------------------- atomic saves


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _FailOnSecond:
    """A save_file that works the first time and, the second time, writes half a file and raises."""

    def __init__(self) -> None:
        self.calls = 0
        self.paths: list[str] = []

    def __call__(self, tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
        self.calls += 1
        self.paths.append(str(path))
        if self.calls == 2:
            Path(path).write_bytes(b"\x00" * 64)  # midway: a partial file exists, then the disk "fills up"
            raise OSError(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)


def test_failed_save_keeps_previous_files_and_leaves_no_temp_files(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FailOnSecond()
    monkeypatch.setattr(dtio, "save_file", fake)
    model = tiny_llama()
    dt.attach(model, lora())
    folder = tmp_path / "out"
    dt.save(model, folder)
    saved = _folder_bytes(folder)
    assert set(saved) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    with torch.no_grad():
        out = model(token_ids()).logits
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)  # the adapter changes, so the second save would write different tensors
    with pytest.raises(OSError, match="No space"):
        dt.save(model, folder)
    assert fake.calls == 2
    assert all(Path(p).parent == folder and Path(p).name != "adapter_model.safetensors" for p in fake.paths)
    assert _folder_bytes(folder) == saved  # both files exactly as the first save left them
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.undo()
    fresh = dt.load(tiny_llama(), folder)
    with torch.no_grad():
        assert close(fresh(token_ids()).logits, out)


def test_failed_save_of_second_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    dt.attach(model, lora())
    dt.attach(model, lora(target_modules=["o_proj"]), name="extra")
    folder = tmp_path / "out"
    fake = _FailOnSecond()
    monkeypatch.setattr(dtio, "save_file", fake)
    with pytest.raises(OSError):
        dt.save(model, folder)  # "default" is written, "extra" fails
    files = _folder_bytes(folder)
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}, sorted(files)
    assert not any(p.name.endswith(".tmp") or p.name.startswith(".") for p in folder.rglob("*"))
    monkeypatch.undo()
    dt.load(tiny_llama(), folder)  # the adapter that was written is complete
    with pytest.raises(dt.AdapterFileError):
        dt.load(tiny_llama(), folder / "extra")  # the one that failed is absent, not half there


def test_folder_with_only_named_adapters_points_to_the_subfolders(tmp_path: Path) -> None:
    """peft puts non-default adapters in subfolders; loading the parent says which to pass."""
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), name="other")
    dt.save(model, tmp_path)
    fresh = tiny_llama()
    before = state_hash(fresh)
    with pytest.raises(dt.AdapterFileError, match=r"subfolders \['other'\]"):
        dt.load(fresh, tmp_path)
    assert state_hash(fresh) == before
    dt.load(fresh, tmp_path / "other", name="other")
    assert dt.adapter_names(fresh) == ["other"]
