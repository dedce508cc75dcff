"""bitsandbytes' paged AdamW, exposed where it can work: a CUDA device and bitsandbytes installed.

Paged optimizers keep their states in CUDA unified memory, which the driver pages out to CPU
memory when the GPU runs short (QLoRA's answer to memory spikes). That needs CUDA's managed
memory, so there is no plain-PyTorch equivalent; on CPU use ``AdamW8bit``. bitsandbytes is
imported only here, when asked for, never when deltatune is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import QuantError

OPTIM_BITS = (8, 32)


def paged_adamw(params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                optim_bits: int = 8) -> torch.optim.Optimizer:
    """``bitsandbytes.optim.PagedAdamW8bit`` (``optim_bits=8``) or ``PagedAdamW32bit`` (``32``)."""
    if optim_bits not in OPTIM_BITS:
        raise ValueError(f"optim_bits={optim_bits!r} is not supported; use one of {OPTIM_BITS}")
    if not torch.cuda.is_available():
        raise QuantError("paged optimizers need a CUDA device (their states live in CUDA unified memory) and "
                         "none is available; use deltatune.quant.AdamW8bit, which runs anywhere")
    try:
        bnb_optim = importlib.import_module("bitsandbytes.optim")
    except ImportError as error:
        raise QuantError("paged optimizers come from bitsandbytes, which is not installed; "
                         "pip install bitsandbytes (or use deltatune.quant.AdamW8bit)") from error
    cls = bnb_optim.PagedAdamW8bit if optim_bits == 8 else bnb_optim.PagedAdamW32bit
    optimizer: torch.optim.Optimizer = cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return optimizer
