"""What a 4-bit layer becomes when adapters are merged into it.

The default is a dense ``nn.Linear`` in the compute dtype holding dequant(W4) + dW: exactly the
function the adapted model computed (up to the compute dtype's rounding of the sum), so nothing
that was trained is lost. Re-quantizing the merged weight gives a 4-bit model again, but the
new codes round W + dW, not W, so the result differs from what was trained; the size of that
difference is measured and reported every time.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import Tensor, nn

from .linear import Linear4bit


class StoredLinear(Protocol):
    """What ``dense_linear`` reads of a quantized linear layer (``Linear4bit``, ``Int4GroupLinear``)."""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype
    bias: nn.Parameter | None

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor: ...


def dense_linear(layer: StoredLinear, weight: Tensor | None, bias: Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` in the compute dtype with ``weight`` (default: the dequantized weight)."""
    dtype = layer.compute_dtype
    dense = weight if weight is not None else layer.dequantize()
    bias = bias if bias is not None else layer.bias
    out = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=dense.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(dense.to(dtype))
        if bias is not None:
            assert out.bias is not None
            out.bias.copy_(bias.to(dtype))
    out.requires_grad_(False)
    return out


def requantized(layer: Linear4bit, weight: Tensor | None, bias: Tensor | None) -> Linear4bit:
    """``weight`` quantized again with the layer's settings; warns with the error that adds."""
    dense = (weight if weight is not None else layer.dequantize(torch.float32)).to(layer.dtype)
    state = layer.quant_state()
    new = Linear4bit.from_weight(dense, bias if bias is not None else layer.bias, state.quant_type, state.blocksize,
                                 state.nested is not None, layer.compute_dtype, layer.weight.dtype)
    warn_requantized(new, dense, state.quant_type, "")
    new.to(layer.weight.device)
    return new


def warn_requantized(new: StoredLinear, dense: Tensor, quant_type: str, why: str) -> None:
    """Warn that ``new`` re-quantized the merged ``dense`` weight, with the error that added (``why``: a hint)."""
    err = new.dequantize(torch.float32) - dense.float()
    rel = (err.norm() / dense.float().norm().clamp_min(1e-30)).item()
    warnings.warn(
        f"re-quantizing a merged {new.out_features}x{new.in_features} weight to {quant_type}{why}: the 4-bit "
        f"layer differs from the merged weight by up to {err.abs().max().item():.3g} (relative Frobenius error "
        f"{rel:.3g}), so its outputs differ from the trained model's. Use requantize=False for a lossless "
        "16-bit merge.", stacklevel=5)
