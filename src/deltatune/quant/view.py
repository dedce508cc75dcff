"""The 4-bit linear layer as the adapters see it: a ``bases.BaseLayer`` kind, registered on import."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bases import BaseLayer, register_base_kind
from ..errors import QuantError
from .linear import Linear4bit
from .merge import dense_linear, requantized


class Linear4bitBase(BaseLayer):
    """deltatune's ``Linear4bit``: read as its dequantized weight in the compute dtype.

    The packed weight cannot take a dense weight back without re-quantizing, which would lose the
    merge (and unmerge would not restore the base), so ``write_weight`` raises: in-place merges
    and inits that rewrite the base are refused, and ``merged_module`` builds a new layer instead,
    16-bit by default (dequant(W4) + dW, lossless with respect to what was trained) or
    re-quantized on request, with a warning that gives the measured error.
    """

    kind = "linear"

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return isinstance(module, Linear4bit)

    @property
    def in_features(self) -> int:
        return self.module.in_features  # type: ignore[return-value]

    @property
    def out_features(self) -> int:
        return self.module.out_features  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.module.compute_dtype  # type: ignore[return-value]

    def read_weight(self) -> Tensor:
        return self.module.dequantize()  # type: ignore[operator]

    def check_writable(self) -> None:
        raise QuantError(
            f"{self.describe()} stores its weight in 4 bits, so a changed dense weight cannot be written into it "
            "exactly (merging in place, or an init that rewrites the base weight). Fix: keep the adapter unmerged "
            "for training and inference, and use dt.unload(model, merge=True) for a 16-bit merged model "
            "(requantize=True re-quantizes it, lossy); for inits that rewrite the base, attach to the "
            "unquantized model."
        )

    def write_weight(self, canonical: Tensor) -> None:
        self.check_writable()

    def merged_module(self, canonical: Tensor | None, bias: Tensor | None, requantize: bool) -> nn.Module:
        layer: Linear4bit = self.module  # type: ignore[assignment]
        if requantize and canonical is None:
            return layer  # nothing folded in: the 4-bit layer is already what re-quantizing would give
        return requantized(layer, canonical, bias) if requantize else dense_linear(layer, canonical, bias)

    def describe(self) -> str:
        return f"Linear4bit({self.in_features} -> {self.out_features}, {self.module.quant_type})"


register_base_kind(Linear4bitBase)
