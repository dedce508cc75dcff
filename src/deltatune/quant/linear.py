"""``Linear4bit``: a frozen linear layer stored as packed 4-bit codes, computing in a 16/32-bit dtype.

Forward dequantizes the weight to the compute dtype and multiplies. The dequantized copy lives
only inside one autograd node's forward and backward: ``Dequantized`` saves the packed bytes and
their state (a few buffers the layer holds anyway) and dequantizes again in backward to form the
input gradient, so training keeps no dense weight per layer. The weight gets no gradient; a
bias, if trained, does.

The layer's ``state_dict`` uses the layout transformers + bitsandbytes serialize (``weight``
packed uint8 ``(n/2, 1)``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__<type>``: JSON bytes with the
non-tensor fields), so a quantized model's state dict is a bitsandbytes checkpoint and back.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blockwise import NestedState, QuantState, dequantize_4bit, quantize_4bit

_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
"""Buffers whose dtype is fixed by the format; ``model.half()`` must not cast them."""


def dense_weight(packed: Tensor, state: QuantState, dtype: torch.dtype) -> Tensor:
    """The weight in ``dtype`` as bitsandbytes computes it: dequantized to the stored dtype, then cast."""
    if state.dtype == torch.float32:  # fp32 -> dtype directly rounds exactly as fp32 -> fp32 -> dtype
        return dequantize_4bit(packed, state, dtype)
    return dequantize_4bit(packed, state).to(dtype)


class Dequantized(torch.autograd.Function):
    """``x @ dequant(W).T + b`` that keeps only the packed weight for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, state: QuantState, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(packed)  # a reference to the layer's buffer, not a copy
        ctx.state = state
        ctx.has_bias = bias is not None
        return F.linear(x, dense_weight(packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, Tensor | None]:
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dense_weight(packed, ctx.state, grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Linear4bit(nn.Module):
    """A linear layer with a 4-bit weight (bitsandbytes' NF4/FP4 format) and an optional bias."""

    weight: Tensor
    absmax: Tensor
    quant_map: Tensor
    nested_absmax: Tensor | None
    nested_quant_map: Tensor | None
    nested_offset: Tensor | None

    def __init__(self, packed: Tensor, state: QuantState, bias: Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"a 4-bit linear weight must be 2-D (out, in), got shape {state.shape}")
        self.out_features, self.in_features = state.shape
        self.dtype = state.dtype
        self.compute_dtype = compute_dtype or state.dtype
        self.quant_type, self.blocksize = state.quant_type, state.blocksize
        self.register_buffer("weight", packed)  # persistent: the packed bytes are the checkpoint's "weight"
        self._set_state(state)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _set_state(self, state: QuantState) -> None:
        nested = state.nested
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("quant_map", state.code, persistent=False)
        self.register_buffer("nested_absmax", None if nested is None else nested.absmax, persistent=False)
        self.register_buffer("nested_quant_map", None if nested is None else nested.code, persistent=False)
        self.register_buffer("nested_offset", None if nested is None else nested.offset, persistent=False)
        self.nested_blocksize = None if nested is None else nested.blocksize

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    quant_storage: torch.dtype = torch.uint8) -> Linear4bit:
        """Quantize a dense ``(out, in)`` weight (as bitsandbytes' ``Linear4bit`` does on ``.to(device)``)."""
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant, quant_storage)
        return cls(packed, state, bias, compute_dtype)

    def quant_state(self) -> QuantState:
        """The current quantization state, built on the layer's buffers (no copies)."""
        nested = None
        if self.nested_absmax is not None:
            assert self.nested_quant_map is not None and self.nested_offset is not None
            assert self.nested_blocksize is not None
            nested = NestedState(self.nested_absmax, self.nested_quant_map, self.nested_offset, self.nested_blocksize)
        return QuantState(self.absmax, (self.out_features, self.in_features), self.dtype, self.blocksize,
                          self.quant_type, self.quant_map, nested)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``(out, in)`` weight in ``dtype`` (default: the compute dtype)."""
        return dense_weight(self.weight, self.quant_state(), dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = Dequantized.apply(x.to(self.compute_dtype), self.weight, self.quant_state(), bias)
        return out.to(dtype)

    def stored_bits(self) -> int:
        """Bits held for the weight: packed codes plus every quantization-state tensor."""
        tensors = [self.weight, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map,
                   self.nested_offset]
        return sum(8 * t.numel() * t.element_size() for t in tensors if t is not None)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        # Device moves apply to everything, but a dtype cast (model.half()) would destroy the exact
        # fp32 scales and code books, so those buffers keep their dtype.
        kept = {name: getattr(self, name) for name in _STATE_BUFFERS if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    # ------------------------------------------------------------------ bitsandbytes state-dict layout

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(state_tensors(self.quant_state(), f"{prefix}weight."))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        mine = [k for k in state_dict if k.startswith(f"{prefix}weight.")]
        packed = state_dict.get(f"{prefix}weight")
        if isinstance(packed, Tensor) and packed.shape == self.weight.shape:
            # take the checkpoint's storage dtype as it is: copy_ would convert the bytes' values
            self.weight = packed.detach().to(self.weight.device).clone()
        if mine:
            try:
                state = read_state({k[len(prefix) + len("weight."):]: state_dict[k] for k in mine})
                self._adopt(state)
            except ValueError as err:
                error_msgs.append(f"{prefix}weight: {err}")
        else:
            missing_keys.append(f"{prefix}weight.quant_state.bitsandbytes__{self.quant_type}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in mine]

    def _adopt(self, state: QuantState) -> None:
        if state.shape != (self.out_features, self.in_features):
            raise ValueError(f"the checkpoint's weight has shape {list(state.shape)}, this layer "
                             f"{[self.out_features, self.in_features]}")
        device = self.weight.device
        self.dtype, self.quant_type, self.blocksize = state.dtype, state.quant_type, state.blocksize
        nested = state.nested
        self._set_state(QuantState(
            state.absmax.to(device).clone(), state.shape, state.dtype, state.blocksize, state.quant_type,
            state.code.to(device).clone(),
            None if nested is None else NestedState(nested.absmax.to(device).clone(), nested.code.to(device).clone(),
                                                    nested.offset.to(device).clone(), nested.blocksize)))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, "
                f"compute_dtype={self.compute_dtype}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_tensors(state: QuantState, prefix: str = "") -> dict[str, Tensor]:
    """The state as bitsandbytes serializes it next to the packed weight (keys relative to ``weight.``)."""
    info: dict[str, Any] = {"quant_type": state.quant_type, "blocksize": state.blocksize,
                            "dtype": _dtype_name(state.dtype), "shape": list(state.shape)}
    out = {f"{prefix}absmax": state.absmax, f"{prefix}quant_map": state.code}
    if state.nested is not None:
        out[f"{prefix}nested_absmax"] = state.nested.absmax
        out[f"{prefix}nested_quant_map"] = state.nested.code
        info.update({"nested_blocksize": state.nested.blocksize, "nested_dtype": "float32",
                     "nested_offset": state.nested.offset.item()})
    packed_json = json.dumps(info).encode("utf-8")  # json.dumps defaults, as bitsandbytes' pack_dict_to_tensor
    out[f"{prefix}quant_state.bitsandbytes__{state.quant_type}"] = torch.tensor(list(packed_json), dtype=torch.uint8)
    return out


def read_state(tensors: dict[str, Tensor]) -> QuantState:
    """Rebuild a ``QuantState`` from the tensors stored under ``weight.`` (keys relative to it)."""
    json_keys = [k for k in tensors if k.startswith("quant_state.bitsandbytes__")]
    if len(json_keys) != 1:
        raise ValueError(f"expected one 'quant_state.bitsandbytes__nf4' or '__fp4' entry, found {json_keys}")
    info = json.loads(bytes(tensors[json_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    for key in ("absmax", "quant_map"):
        if key not in tensors:
            raise ValueError(f"the quantization state lacks 'weight.{key}'")
    nested = None
    if "nested_absmax" in tensors:
        nested = NestedState(tensors["nested_absmax"].float(), tensors["nested_quant_map"].float(),
                             torch.tensor(float(info["nested_offset"]), dtype=torch.float32),
                             int(info["nested_blocksize"]))
    return QuantState(tensors["absmax"], tuple(int(s) for s in info["shape"]), getattr(torch, info["dtype"]),
                      int(info["blocksize"]), str(info["quant_type"]), tensors["quant_map"].float(), nested)
