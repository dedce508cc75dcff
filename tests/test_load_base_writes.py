"""What a load writes into the base is the adapter's, undone by deleting or unloading it; keys the
config does not account for are refused before anything changes."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from conftest import state_hash, tiny_gpt2, tiny_llama, token_ids

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"


def peft_folder(tmp_path: Path, name: str, targets: list[str], seed: int, **fields: object) -> Path:
    """A peft LoRA folder on tiny_llama whose embedding table was changed (as after resizing or
    training it), so peft saves the table itself next to the LoRA factors."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False,
                                                              **fields))  # type: ignore[arg-type]
    with torch.no_grad():
        table = model.get_input_embeddings()
        weight = table.base_layer.weight if hasattr(table, "base_layer") else table.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def add_key(folder: Path, key: str, value: torch.Tensor) -> None:
    tensors = load_file(folder / WEIGHTS)
    tensors[key] = value
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "lm_head.weight"])
def test_table_the_config_does_not_target_is_refused(tmp_path: Path, key: str) -> None:
    folder = peft_folder(tmp_path, "a", ["q_proj", "v_proj"], seed=1)
    add_key(folder, PREFIX + key, torch.randn(128, 64))
    model = tiny_llama()
    before = state_hash(model)
    with pytest.raises(dt.AdapterFileError, match="does not account for") as info:
        dt.load(model, folder)
    assert key in str(info.value)
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")


def test_targeted_table_is_written_and_restored_by_delete_and_unload(tmp_path: Path) -> None:
    folder = peft_folder(tmp_path, "a", ["embed_tokens", "q_proj"], seed=1)
    assert any("embed_tokens.base_layer.weight" in k for k in load_file(folder / WEIGHTS))
    model = tiny_llama()
    original = model.get_input_embeddings().weight.detach().clone()
    before = state_hash(model)
    dt.load(model, folder)
    assert not torch.equal(model.get_input_embeddings().weight, original)  # the file's table is live
    dt.delete_adapter(model, "default")
    assert state_hash(model) == before
    dt.load(model, folder)
    dt.unload(model, merge=False)
    assert state_hash(model) == before


def test_two_loads_writing_one_table_restore_the_base_in_any_order(tmp_path: Path) -> None:
    folders = [peft_folder(tmp_path, n, ["embed_tokens", "q_proj"], seed=s) for n, s in (("a", 1), ("b", 2))]
    for order in (["a", "b"], ["b", "a"]):
        model = tiny_llama()
        before = state_hash(model)
        dt.load(model, folders[0], name="a")
        after_a = model.get_input_embeddings().weight.detach().clone()
        dt.load(model, folders[1], name="b")
        dt.delete_adapter(model, order[0])
        if order[0] == "b":  # the table the remaining adapter loaded is live again
            assert torch.equal(model.get_input_embeddings().weight, after_a)
        dt.delete_adapter(model, order[1])
        assert state_hash(model) == before, order


def test_loaded_biases_are_restored_on_delete(tmp_path: Path) -> None:
    source = tiny_gpt2()
    dt.attach(source, dt.LoraConfig(r=2, target_modules=["c_attn"], bias="all", init_lora_weights=False))
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith("bias"):
                param.add_(1.0)  # as if trained
    dt.save(source, tmp_path / "a")
    model = tiny_gpt2()
    before = state_hash(model)
    dt.load(model, tmp_path / "a")
    assert state_hash(model) != before
    dt.delete_adapter(model, "default")
    assert state_hash(model) == before


def test_saved_module_part_for_a_module_not_saved_is_refused(tmp_path: Path) -> None:
    folder = peft_folder(tmp_path, "a", ["q_proj"], seed=1)
    add_key(folder, PREFIX + "model.norm.original_module.weight", torch.ones(64))
    model = tiny_llama()
    before = state_hash(model)
    with pytest.raises(dt.AdapterFileError, match="norm.original_module"):
        dt.load(model, folder)
    assert state_hash(model) == before


def test_outputs_with_a_loaded_table_match_peft(tmp_path: Path) -> None:
    folder = peft_folder(tmp_path, "a", ["embed_tokens", "q_proj"], seed=1)
    ours = dt.load(tiny_llama(), folder)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), folder)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_modules_untouched_by_base_writes_keep_their_identity(tmp_path: Path) -> None:
    folder = peft_folder(tmp_path, "a", ["embed_tokens", "q_proj"], seed=1)
    model = tiny_llama()
    table: nn.Parameter = model.get_input_embeddings().weight
    dt.load(model, folder)
    dt.delete_adapter(model, "default")
    assert model.get_input_embeddings().weight is table  # restored in place, not replaced
