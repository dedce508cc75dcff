"""Working inside ``transformers.Trainer``: the adapters saved into every Trainer checkpoint."""

from __future__ import annotations

from typing import Any

from ..hf import save_callback
from ..io import save


def adapter_checkpoint_callback() -> Any:
    """A ``transformers.TrainerCallback`` that writes the adapters into every Trainer checkpoint.

    The Trainer saves checkpoints with the model's own ``save_pretrained``, which stores the
    whole adapted state dict; with this callback each ``checkpoint-N`` folder also holds the
    adapters in peft's format (adapter_config.json + adapter_model.safetensors), which is what
    ``dt.load`` and peft read.
    """
    return save_callback(save)
