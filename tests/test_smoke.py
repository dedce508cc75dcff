"""A first end-to-end pass: attach, train a step, merge, save, load."""

from __future__ import annotations

import torch

import deltatune as dt
from conftest import close, lm_losses, tiny_llama, token_ids


def test_attach_train_merge_save_load(tmp_path) -> None:
    model = tiny_llama()
    ids = token_ids()
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable, total = dt.trainable_parameters(model)
    assert 0 < trainable < total
    losses = lm_losses(model, ids, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    out = model(ids).logits
    dt.save(model, tmp_path)
    fresh = dt.load(tiny_llama(), tmp_path)
    assert close(fresh(ids).logits, out)
    dt.merge(model)
    assert close(model(ids).logits, out)


def test_import_loads_neither_peft_nor_transformers() -> None:
    """peft is a test oracle only and transformers is optional: importing deltatune pulls in neither."""
    import subprocess
    import sys

    code = "import sys, deltatune; print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
