"""4-bit base models for QLoRA, in plain PyTorch, in bitsandbytes 0.50's format bit for bit.

- ``blockwise``: NF4 / FP4 blockwise quantization with double quantization (``quantize_4bit``,
  ``dequantize_4bit``) and the blockwise 8-bit code used for absmax and optimizer states.
- ``int4_group`` / ``int4_linear``: ``Int4GroupLinear``, asymmetric INT4 per group of inputs
  (``QuantConfig(quant_type="int4_group")``), into whose offsets QA-LoRA adapters merge losslessly.
- ``linear``: ``Linear4bit``, a frozen linear layer holding packed codes; a base kind in
  ``bases.py``, so every weight-space method works on it.
- ``model``: ``quantize(model, QuantConfig(...))`` and ``dequantize(model)``.
- ``checkpoint``: ``save_quantized`` / ``load_quantized`` in transformers + bitsandbytes' layout.
- ``merge``: what a 4-bit layer becomes when adapters are merged into it.
- ``optim``: ``AdamW8bit``, AdamW with blockwise 8-bit states.
- ``paged``: ``paged_adamw``, bitsandbytes' paged AdamW (CUDA + bitsandbytes only).
"""

from .blockwise import NestedState, QuantState, dequantize_4bit, quantize_4bit
from .checkpoint import load_quantized, save_quantized
from .config import QuantConfig
from .int4_linear import Int4GroupLinear
from .linear import Linear4bit
from .model import dequantize, quantize
from .optim import AdamW8bit
from .paged import paged_adamw
from . import view as _view  # registers the 4-bit layer as a base kind

__all__ = [
    "AdamW8bit",
    "Int4GroupLinear",
    "Linear4bit",
    "NestedState",
    "QuantConfig",
    "QuantState",
    "dequantize",
    "dequantize_4bit",
    "load_quantized",
    "paged_adamw",
    "quantize",
    "quantize_4bit",
    "save_quantized",
]
