"""A deltatune-adapted model trains inside transformers.Trainer and leaves peft-format adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.train import adapter_checkpoint_callback
from deltatune.io import adapter_tensors
from test_train import make_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_transformers_trainer_trains_and_checkpoints_a_peft_adapter(
        tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    model, task, train, test = make_run(tiny_bert_dir, sentiment_file, dropout=0.0)
    before = task.evaluate(model, test, 64)["accuracy"]
    start = {k: t.detach().clone() for k, t in adapter_tensors(model, "default").items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16, learning_rate=1e-2,
                             save_steps=40, report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train, data_collator=task.collate,
            callbacks=[adapter_checkpoint_callback()]).train()
    model.eval()
    assert task.evaluate(model, test, 64)["accuracy"] >= max(0.9, before + 0.2)
    assert any(not torch.equal(start[k], t) for k, t in adapter_tensors(model, "default").items())

    folder = tmp_path / "checkpoint-40"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    fresh = task.load_model(str(tiny_bert_dir)).eval()
    peft_model = PeftModel.from_pretrained(fresh, folder).eval()
    batch = task.collate([{k: v for k, v in f.items() if k != "labels"} for f in test[:8]])
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, model(**batch).logits, atol=1e-5)
    assert dt.adapter_names(model) == ["default"]
