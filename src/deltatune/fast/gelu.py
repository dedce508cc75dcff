"""GPT-2's tanh-approximated GELU ("gelu_new") as ATen's single fused kernel.

transformers' ``NewGELUActivation`` spells ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))``
out in Python operators: six full-size temporaries in forward and as many autograd nodes in
backward, on the widest activation of every block (4 x hidden). ``F.gelu(x, approximate="tanh")``
is the same formula in one kernel forward and one backward (equal within fp32 rounding: tested).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

GELU_TANH_CLASSES = frozenset({"NewGELUActivation"})
"""Modules computing exactly the tanh approximation of GELU with its standard constants."""


def fused_gelu_forward(module: nn.Module) -> Callable[..., Any]:
    """The replacement ``forward`` for a ``NewGELUActivation`` instance."""

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")

    return types.MethodType(forward, module)
