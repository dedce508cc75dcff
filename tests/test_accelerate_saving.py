"""accelerate's saving of a deltatune-adapted model (issue 14).

``Accelerator.save_model`` has no hook and does not dispatch on the model: it writes
``unwrap_model(model).state_dict()`` (accelerate 1.x, ``Accelerator.save_model`` / ``get_state_dict``), so
the adapter folder comes from accelerate's own idiom for transformers models,
``accelerator.unwrap_model(model).save_pretrained(...)``, which an adapted model answers with peft's adapter
folder. The whole-state-dict folders accelerate writes (``save_model``, ``save_state``) stay what they are
for accelerate (exact restore into the same adapted model, resuming) and are refused, with the way to load
them, by every adapter or model loader: none reads them into a silently wrong model.
Tiny random LLaMA saved to disk (so the adapter config names a local base), CPU, one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltatune as dt
from conftest import perturb, state_hash
from test_hf_saving import ADAPTER_FILES, IDS, LORA, adapted, base_dir, fresh, logits  # noqa: F401 (base_dir: a fixture)
from deltatune.errors import AdapterFileError

accelerate = pytest.importorskip("accelerate")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def train_steps(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` optimizer steps on fixed batches (no data loader, no sampling: nothing random)."""
    model.train()
    for step in range(steps):
        ids = IDS.roll(step, dims=1)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def prepared(base_dir: Path, seed: int = 0) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = adapted(base_dir, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_accelerates_save_pretrained_idiom_writes_an_adapter_every_loader_reads(tmp_path: Path,
                                                                                base_dir: Path) -> None:
    """The call accelerate documents for transformers models (is_main_process, save_function and the
    gathered state_dict passed along) writes exactly dt.save's adapter folder; transformers, peft and
    deltatune load it to the trained model's outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    accelerator, model, optimizer = prepared(base_dir)
    train_steps(accelerator, model, optimizer, 2)
    expected = logits(model)
    folder = tmp_path / "adapter"
    accelerator.unwrap_model(model).save_pretrained(folder, is_main_process=accelerator.is_main_process,
                                                    save_function=accelerator.save,
                                                    state_dict=accelerator.get_state_dict(model))
    assert sorted(p.name for p in folder.iterdir()) == ADAPTER_FILES
    dt.save(accelerator.unwrap_model(model), tmp_path / "dt")
    for name in ADAPTER_FILES[1:]:
        assert (folder / name).read_bytes() == (tmp_path / "dt" / name).read_bytes()
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(folder)), expected, atol=1e-5)
    assert torch.allclose(logits(PeftModel.from_pretrained(fresh(base_dir), folder)), expected, atol=1e-5)
    assert torch.allclose(logits(dt.load(fresh(base_dir), folder)), expected, atol=1e-5)


def test_a_plain_torch_model_saves_with_dt_save_of_the_unwrapped_model(tmp_path: Path) -> None:
    """A model without save_pretrained (a torch module): ``dt.save(accelerator.unwrap_model(model), dir)``."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    reference.load_state_dict(base.state_dict())
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(dt.attach(base, dt.LoraConfig(r=2, target_modules=("0", "2"))))
    perturb(model, 3)
    x = torch.randn(5, 8)
    dt.save(accelerator.unwrap_model(model), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(dt.load(reference, tmp_path / "adapter")(x), model(x), atol=1e-6)


def _keys(folder: Path) -> list[str]:
    keys: list[str] = []
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), "pt") as file:
            keys.extend(file.keys())
    return keys


@pytest.mark.parametrize("shard", ["10GB", "20KB"])
def test_save_model_writes_a_state_dict_that_no_loader_misreads(tmp_path: Path, base_dir: Path, shard: str) -> None:
    """What Accelerator.save_model writes (one file or shards): the adapted state dict, wrapper keys
    included. accelerate reloads it exactly into the same adapted model; dt.load refuses it saying how to
    load it, peft and transformers refuse it (no adapter_config.json, no config.json), and a strict load
    into a model without the adapter fails rather than dropping it."""
    from accelerate.utils import load_checkpoint_in_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    accelerator, model, _ = prepared(base_dir)
    expected = logits(model)
    folder = tmp_path / "state"
    accelerator.save_model(model, folder, max_shard_size=shard)
    assert (len(list(folder.glob("model-*-of-*.safetensors"))) > 1) == (shard == "20KB")
    keys = _keys(folder)
    assert any(".base_layer." in k for k in keys) and any(".deltas.default." in k for k in keys)

    target = adapted(base_dir, seed=1)
    load_checkpoint_in_model(target, str(folder), strict=True)
    assert torch.equal(logits(target), expected)

    plain = fresh(base_dir)
    before = state_hash(plain)
    with pytest.raises(AdapterFileError, match=r"whole adapted model's state dict.*unwrap_model\(model\)"
                                               r"\.save_pretrained"):
        dt.load(plain, folder)
    assert state_hash(plain) == before
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(plain, folder)
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_checkpoint_in_model(fresh(base_dir), str(folder), strict=True)


def test_save_state_and_load_state_resume_the_same_run(tmp_path: Path, base_dir: Path) -> None:
    """Accelerator.save_state / load_state checkpoint an adapted model and its optimizer: a run resumed
    from the checkpoint into a fresh adapted model continues to the same tensors as the uninterrupted
    run. The checkpoint folder is refused by dt.load with the way to load it, and by a model without
    the adapter (accelerate's strict safetensors load)."""
    accelerator, model, optimizer = prepared(base_dir)
    train_steps(accelerator, model, optimizer, 2)
    checkpoint = tmp_path / "checkpoint"
    accelerator.save_state(str(checkpoint))
    train_steps(accelerator, model, optimizer, 2)
    expected = logits(model)

    resumed, model2, optimizer2 = prepared(base_dir, seed=5)
    assert not torch.equal(logits(model2), expected)
    resumed.load_state(str(checkpoint))
    train_steps(resumed, model2, optimizer2, 2)
    assert torch.equal(logits(model2), expected)

    with pytest.raises(AdapterFileError, match="whole adapted model's state dict"):
        dt.load(fresh(base_dir), checkpoint)
    from accelerate import Accelerator

    other = Accelerator(cpu=True)
    other.prepare(fresh(base_dir))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state(str(checkpoint))
