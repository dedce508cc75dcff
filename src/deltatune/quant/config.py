"""``QuantConfig``: how ``dt.quantize`` stores a model's linear layers (frozen, validated once).

Field names follow transformers' ``BitsAndBytesConfig`` where they overlap
(``bnb_4bit_quant_type`` -> ``quant_type``, ``bnb_4bit_use_double_quant`` -> ``double_quant``,
``bnb_4bit_compute_dtype`` -> ``compute_dtype``, ``bnb_4bit_quant_storage`` -> ``quant_storage``,
``llm_int8_skip_modules`` -> ``skip_modules``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from .blockwise import BLOCKSIZES, FLOAT_DTYPES, STORAGE_DTYPES
from .codes import QUANT_TYPES

INT4_GROUP = "int4_group"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """4-bit quantization settings for ``dt.quantize``.

    ``skip_modules``: names of modules kept unquantized (a full module name or its last dotted
    parts, as in ``target_modules``); None keeps the output head (``lm_head``) only; an explicit
    list replaces that default, as transformers does. ``compute_dtype`` None computes in each
    layer's original dtype. ``prepare_for_training`` freezes every parameter, keeps unquantized
    parameters (norms, embeddings, head) in fp32 and makes the input embeddings' output require grad, so that gradient checkpointing
    works on a frozen base.
    ``quant_type="int4_group"`` stores asymmetric INT4 per ``group_size`` inputs (``int4_group``; QA-LoRA
    adapters merge into it losslessly) and ignores ``blocksize``, ``double_quant`` and ``quant_storage``.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None
    quant_storage: torch.dtype = torch.uint8
    skip_modules: tuple[str, ...] | None = None
    prepare_for_training: bool = True
    group_size: int = 64
    """``quant_type="int4_group"`` only: inputs per (scale, offset) pair (``int4_group``)."""

    def __post_init__(self) -> None:
        if isinstance(self.skip_modules, (list, set, frozenset)):
            object.__setattr__(self, "skip_modules", tuple(sorted(self.skip_modules)))
        self.check(self.quant_type in (*QUANT_TYPES, INT4_GROUP), "quant_type",
                   f"supported formats are {(*QUANT_TYPES, INT4_GROUP)}",
                   "pass quant_type='nf4' (best for normally distributed weights), 'fp4', or 'int4_group' (asymmetric "
                   "INT4 per group of inputs: QA-LoRA adapters merge into it losslessly)")
        self.check(isinstance(self.group_size, int) and not isinstance(self.group_size, bool)
                   and self.group_size >= 2 and self.group_size % 2 == 0, "group_size",
                   "the group size must be an even integer >= 2", "pass group_size=64 (or 32, 128)")
        self.check(isinstance(self.blocksize, int) and not isinstance(self.blocksize, bool)
                   and self.blocksize in BLOCKSIZES, "blocksize", f"bitsandbytes' 4-bit format allows {BLOCKSIZES}",
                   "pass blocksize=64 (QLoRA's choice)")
        for flag in ("double_quant", "prepare_for_training"):
            self.check(isinstance(getattr(self, flag), bool), flag, f"{flag} must be a bool", "pass True or False")
        self.check(self.compute_dtype is None or self.compute_dtype in FLOAT_DTYPES, "compute_dtype",
                   f"the compute dtype must be one of {FLOAT_DTYPES}",
                   "pass torch.bfloat16 (or torch.float32 on CPUs without fast bf16), or None for the weight's dtype")
        self.check(self.quant_storage in STORAGE_DTYPES, "quant_storage",
                   f"packed bytes can be stored as {STORAGE_DTYPES}", "pass torch.uint8 unless FSDP needs another dtype")
        skip = self.skip_modules
        self.check(skip is None or (isinstance(skip, tuple) and all(isinstance(n, str) and n for n in skip)),
                   "skip_modules", "it must be a list of module names or None",
                   "pass e.g. ['lm_head'], or None to keep only the output head unquantized")

    def check(self, ok: bool, field: str, why: str, fix: str) -> None:
        """Raise a ConfigError naming ``field``, its value, the reason and the fix unless ``ok``."""
        if not ok:
            raise ConfigError(type(self).__name__, field, getattr(self, field), why, fix)

    def replace(self, **changes: object) -> QuantConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
