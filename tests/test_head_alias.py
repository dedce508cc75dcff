"""A task head peft does not know by name (T5's and BART's ``classification_head``): a new adapter
trains and saves it (``config.HEAD_ALIASES``); a peft folder, which saves no such head, still loads."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import deltatune as dt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def t5_classifier() -> nn.Module:
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100, num_labels=3,
                      decoder_start_token_id=0)
    return T5ForSequenceClassification(config).eval()


def test_a_new_adapter_trains_and_saves_the_classification_head(tmp_path: Path) -> None:
    model = dt.attach(t5_classifier(), dt.LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_CLS"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("classification_head.") for n in trained)
    dt.save(model, tmp_path)
    assert "classification_head" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]


def test_a_peft_folder_without_the_head_loads_as_peft_wrote_it(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(t5_classifier(), peft.LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_CLS",
                                                                   init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 1]])
    ours = dt.load(t5_classifier(), tmp_path)
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs.eval()(input_ids=ids).logits).abs().max() <= 1e-5
