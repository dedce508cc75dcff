"""deltatune from a plain ``pip install deltatune`` (no extras): import, attach, save, load.

Run by ``make test-plain`` in a fresh virtual environment holding only torch and ``pip install .``
(see the Makefile). Not a pytest module (pytest is not installed there): a script that exits 0 when
every check passes and raises otherwise. It first checks that the environment is really plain, so a
dependency that creeps in through an extra cannot hide a missing base requirement.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

OPTIONAL = ("transformers", "peft", "yaml", "trl", "accelerate", "datasets", "pytest")
"""What the extras bring; none may be installed here."""


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def main() -> None:
    present = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
    assert not present, f"not a plain install: {present} are installed"
    import deltatune as dt

    adapted = dt.attach(model(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    with torch.no_grad():
        for param in adapted.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))  # no adapter tensor left at its zero init
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = adapted(x)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        dt.save(adapted, folder)
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors"], names
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        loaded = dt.load(model(), folder)
        with torch.no_grad():
            got = loaded(x)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    with torch.no_grad():
        merged = dt.unload(loaded, merge=True)(x)
    assert torch.allclose(merged, expected, atol=1e-5), (merged - expected).abs().max()
    print(f"plain install OK: deltatune {dt.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
