"""Working inside ``transformers.Trainer`` (and trainers built on it, such as trl's ``SFTTrainer``).

An adapted model's ``save_pretrained`` writes adapter folders (``deltatune.pretrained``), so
``Trainer.save_model`` and every ``checkpoint-N`` folder hold peft's adapter files, not the whole
model. The Trainer itself only knows how to reload a checkpoint into a model that is not a
``peft.PeftModel`` from a full ``model.safetensors``: resuming (``train(resume_from_checkpoint=...)``)
and ``load_best_model_at_end`` fail on a folder with adapter files alone. The callback here adds what
they read: ``model.safetensors`` holding the adapters' tensors under the model's state-dict names
(kilobytes to megabytes, not the base model), which the Trainer loads with ``load_state_dict(strict=False)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from ..files import replace_files
from ..hf import save_callback
from ..io import CONFIG_NAME, save
from ..layer import ADAPTER_PARTS

RESUME_NAME = "model.safetensors"
"""transformers' SAFE_WEIGHTS_NAME: the file its Trainer reloads a non-peft model's checkpoint from."""


def adapter_checkpoint_callback() -> Any:
    """A ``transformers.TrainerCallback`` that makes every Trainer checkpoint resumable and complete.

    Pass it in ``Trainer(..., callbacks=[adapter_checkpoint_callback()])`` (any Trainer subclass, trl's
    too). After each checkpoint it writes ``model.safetensors`` with the adapters' tensors (what
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` load; the Trainer warns there that the base
    weights are "missing" from it: they are the frozen base, already in the model), and the adapter
    folder itself (adapter_config.json, adapter_model.safetensors) when the model's own
    ``save_pretrained`` did not write one (a model that is not a transformers ``PreTrainedModel``).
    """
    return save_callback(complete_checkpoint)


def complete_checkpoint(model: nn.Module, folder: Path) -> None:
    """Add to a Trainer checkpoint folder what resuming from it needs (see the module docstring)."""
    if not (folder / CONFIG_NAME).is_file() and not any(p.is_file() for p in folder.glob(f"*/{CONFIG_NAME}")):
        save(model, folder)
    if not (folder / RESUME_NAME).is_file():
        tensors = resume_tensors(model)
        replace_files(folder, {RESUME_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"})},
                      first=RESUME_NAME)


def resume_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state-dict entries that belong to its adapters or train (trained base biases), as
    copies on the CPU: what ``load_state_dict(strict=False)`` needs to put the training state back."""
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in trained or any(part in ADAPTER_PARTS for part in key.split(".")[:-1]):
            out[key] = value.detach().to("cpu").contiguous().clone()  # clones: safetensors refuses shared storage
    return out
