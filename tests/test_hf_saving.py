"""An adapted model saves as an adapter wherever the Hugging Face ecosystem saves it (issue 14).

``model.save_pretrained``, ``Trainer.save_model``, Trainer checkpoints (and resuming from them), trl's
``SFTTrainer`` and accelerate: each writes peft's adapter folder, which transformers' ``from_pretrained``,
``PeftModel.from_pretrained`` and ``dt.load`` read back to the same outputs; no folder written here loads
into a silently wrong model. Tiny random LLaMA models, saved to disk so that the adapter config names a
local base (transformers then reads the folder through its peft integration, offline).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import perturb
from deltatune.io import adapter_tensors
from deltatune.model_card import MARK
from deltatune.train import adapter_checkpoint_callback
from prompt_models import llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IDS = torch.tensor([[1, 5, 7, 9, 11, 13], [1, 20, 30, 40, 50, 60]])
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama().save_pretrained(folder)
    return folder


def fresh(base_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def adapted(base_dir: Path, seed: int = 0) -> nn.Module:
    model = dt.attach(fresh(base_dir), dt.LoraConfig(**LORA))  # type: ignore[arg-type]
    perturb(model, seed)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def assert_loads_everywhere(folder: Path, base_dir: Path, expected: torch.Tensor) -> None:
    """transformers' from_pretrained (peft integration), peft and deltatune give ``expected``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(folder)), expected, atol=1e-5)
    assert torch.allclose(logits(PeftModel.from_pretrained(fresh(base_dir), folder)), expected, atol=1e-5)
    assert torch.allclose(logits(dt.load(fresh(base_dir), folder)), expected, atol=1e-5)


# --------------------------------------------------------------------------- model.save_pretrained


def test_save_pretrained_writes_what_dt_save_writes(tmp_path: Path, base_dir: Path) -> None:
    model = adapted(base_dir)
    model.save_pretrained(tmp_path / "pretrained")
    dt.save(model, tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "pretrained")) == ADAPTER_FILES
    for name in ADAPTER_FILES:
        assert (tmp_path / "pretrained" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes()
    assert type(model).__name__ == "LlamaForCausalLM"  # the class is never changed
    assert_loads_everywhere(tmp_path / "pretrained", base_dir, logits(model))


def test_unload_gives_the_model_its_own_save_pretrained_back(tmp_path: Path, base_dir: Path) -> None:
    model = adapted(base_dir)
    twin = copy.deepcopy(model)
    twin.save_pretrained(tmp_path / "twin")  # a deep copy saves its own adapters
    assert sorted(os.listdir(tmp_path / "twin")) == ADAPTER_FILES
    expected = logits(model)
    dt.unload(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "config.json").is_file() and not (tmp_path / "full" / "adapter_config.json").exists()
    assert torch.allclose(logits(fresh(tmp_path / "full")), expected, atol=1e-5)


def test_a_model_whose_adapters_were_all_deleted_saves_in_full(tmp_path: Path, base_dir: Path) -> None:
    model = adapted(base_dir)
    dt.delete_adapter(model, "default")
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert torch.allclose(logits(fresh(tmp_path / "out")), logits(fresh(base_dir)), atol=1e-6)


def test_other_ranks_write_nothing_and_push_to_hub_is_refused(tmp_path: Path, base_dir: Path) -> None:
    model = adapted(base_dir)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(dt.AdapterError, match="upload_folder"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_an_adapter_of_a_model_built_in_code_does_not_load_silently(tmp_path: Path) -> None:
    """No base path to record: transformers cannot build the base, and says so."""
    from transformers import AutoModelForCausalLM

    model = dt.attach(llama(), dt.LoraConfig(**LORA))  # type: ignore[arg-type]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    with pytest.raises(OSError):  # offline here; online, the hub has no model "None" either
        AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)


def test_model_card(tmp_path: Path, base_dir: Path) -> None:
    model = adapted(base_dir)
    dt.attach(model, dt.LoraConfig(**LORA), name="other")  # type: ignore[arg-type]
    dt.save(model, tmp_path)
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert f'base_model: "{base_dir}"' in front and "library_name: peft" in front
    assert '- "deltatune"' in front and '- "lora"' in front and f'- "base_model:adapter:{base_dir}"' in front
    assert (tmp_path / "other" / "README.md").is_file()  # every adapter folder carries its card
    mine = "# my notes\n"
    (tmp_path / "README.md").write_text(mine)
    dt.save(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == mine  # a card the user wrote is kept
    edited = card.replace(MARK, "") + "\nmy edits\n"  # removing the mark line makes the card the user's
    (tmp_path / "other" / "README.md").write_text(edited)
    dt.save(model, tmp_path)
    assert (tmp_path / "other" / "README.md").read_text() == edited
    (tmp_path / "README.md").unlink()
    dt.save(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == card  # a fresh card once the user's is gone


def test_peft_reads_the_model_card_as_its_own(tmp_path: Path, base_dir: Path) -> None:
    """peft's save_pretrained updates a README.md in place: ours parses as a model card for it."""
    from huggingface_hub import ModelCard

    dt.save(adapted(base_dir), tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == str(base_dir)
    assert "deltatune" in card.data.tags


# --------------------------------------------------------------------------- transformers.Trainer


def lm_rows(n: int = 32) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 128, (8,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}


def trainer_for(model: nn.Module, out: Path, steps: int, callbacks: list[Any] | None = None, **extra: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=2, report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True,
                             **extra)
    return Trainer(model=model, args=args, train_dataset=lm_rows(), eval_dataset=lm_rows(8), data_collator=collate,
                   callbacks=callbacks)


def test_trainer_save_model_and_checkpoints_are_adapters(tmp_path: Path, base_dir: Path) -> None:
    model = adapted(base_dir)
    trainer = trainer_for(model, tmp_path / "run", 4)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    expected = logits(model)
    assert [n for n in ADAPTER_FILES if n not in os.listdir(tmp_path / "final")] == []
    assert not any(n.startswith("model") for n in os.listdir(tmp_path / "final"))  # no full model
    assert_loads_everywhere(tmp_path / "final", base_dir, expected)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert not any(n.startswith("model") for n in os.listdir(checkpoint))
    assert_loads_everywhere(checkpoint, base_dir, expected)


def test_a_checkpoint_without_the_callback_cannot_resume_and_says_so(tmp_path: Path, base_dir: Path) -> None:
    trainer_for(adapted(base_dir), tmp_path, 2).train()
    with pytest.raises(ValueError, match="checkpoint"):
        trainer_for(adapted(base_dir), tmp_path, 4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path: Path, base_dir: Path) -> None:
    straight = adapted(base_dir)
    trainer_for(straight, tmp_path / "straight", 4, [adapter_checkpoint_callback()]).train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    resume = load_file(checkpoint / "model.safetensors")
    assert resume and all(".deltas." in k for k in resume)  # the adapter's state only, never the base
    halfway = dt.load(fresh(base_dir), checkpoint)
    assert_loads_everywhere(checkpoint, base_dir, logits(halfway))  # the resume file disturbs no loader
    resumed = adapted(base_dir, seed=1)  # other values: the checkpoint must overwrite them
    trainer_for(resumed, tmp_path / "resumed", 4, [adapter_checkpoint_callback()]).train(
        resume_from_checkpoint=str(checkpoint))
    for key, value in adapter_tensors(straight, "default").items():
        assert torch.allclose(adapter_tensors(resumed, "default")[key], value, atol=1e-6), key


def test_load_best_model_at_end(tmp_path: Path, base_dir: Path) -> None:
    model = adapted(base_dir)
    trainer = trainer_for(model, tmp_path, 4, [adapter_checkpoint_callback()], eval_strategy="steps", eval_steps=2,
                          load_best_model_at_end=True, metric_for_best_model="loss")
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert torch.allclose(logits(model), logits(dt.load(fresh(base_dir), best)), atol=1e-5)


def test_a_quantized_model_saves_an_adapter_that_reloads(tmp_path: Path, base_dir: Path) -> None:
    model = dt.quantize(fresh(base_dir), dt.QuantConfig(prepare_for_training=False))
    dt.attach(model, dt.LoraConfig(**LORA))  # type: ignore[arg-type]
    perturb(model)
    trainer = trainer_for(model, tmp_path / "run", 2, [adapter_checkpoint_callback()])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    expected = logits(model)
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        again = dt.quantize(fresh(base_dir), dt.QuantConfig(prepare_for_training=False))
        assert torch.allclose(logits(dt.load(again, folder)), expected, atol=1e-5)
    assert max(p.stat().st_size for p in (tmp_path / "run" / "checkpoint-2").glob("*.safetensors")) < 100_000


# --------------------------------------------------------------------------- trl and accelerate


def chat_tokenizer(folder: Path) -> Any:
    from task_fixtures import word_tokenizer

    tokenizer = word_tokenizer(folder, "decoder")
    tokenizer.pad_token = "[PAD]"
    return tokenizer


def test_trl_sft_trainer_saves_an_adapter(tmp_path: Path, base_dir: Path) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = chat_tokenizer(tmp_path / "tok")
    model = adapted(base_dir)
    data = Dataset.from_dict({"text": [" ".join(f"a{i % 16} b{(i * 3) % 16}" for i in range(k, k + 6))
                                       for k in range(16)]})
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, save_steps=2,
                     report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True, max_length=32,
                     bf16=False)  # trl's default bf16 leaves the model's forward under autocast (accelerate): inexact
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[adapter_checkpoint_callback()])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    expected = logits(model)
    assert "adapter_config.json" in os.listdir(tmp_path / "final")
    assert not any(n.startswith("model") for n in os.listdir(tmp_path / "final"))
    assert_loads_everywhere(tmp_path / "final", base_dir, expected)
    assert_loads_everywhere(tmp_path / "run" / "checkpoint-2", base_dir, expected)


def test_trl_takes_a_deltatune_config_only_through_the_model(tmp_path: Path, base_dir: Path) -> None:
    """``peft_config=`` is for peft's configs (trl calls peft with it): documented in docs/training.md."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, max_length=32)
    data = Dataset.from_dict({"text": ["a1 b1 a2 b2"] * 4})
    with pytest.raises(TypeError, match="peft_config"):
        SFTTrainer(model=fresh(base_dir), args=args, train_dataset=data, processing_class=chat_tokenizer(tmp_path / "t"),
                   peft_config=dt.LoraConfig(**LORA))  # type: ignore[arg-type]
