"""Read and write 4-bit checkpoints in the layout transformers + bitsandbytes serialize.

A quantized model's ``state_dict()`` already has that layout (``Linear4bit`` writes it), so
saving is a safetensors file of the state dict. Loading goes the other way for any model built
from its config: every module whose key carries a ``weight.quant_state.bitsandbytes__<type>``
entry becomes a ``Linear4bit`` holding exactly the stored bytes (bit-exact both ways), and the
rest loads as usual. The file is checked completely before the model is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import QuantError
from .linear import Linear4bit, read_state

QUANT_STATE_KEY = ".weight.quant_state.bitsandbytes__"


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model.state_dict()`` to one safetensors file (tied tensors are stored once, under their first name)."""
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        ident = (value.data_ptr(), value.numel())
        if value.numel() and ident in seen:
            continue
        seen.add(ident)
        tensors[key] = value.detach().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_quantized(model: nn.Module, source: str | os.PathLike[str] | dict[str, Tensor],
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a 4-bit checkpoint (a safetensors file or a state dict) into ``model``, in place.

    Modules stored 4-bit in the checkpoint are replaced by ``Linear4bit`` layers computing in
    ``compute_dtype`` (default: the stored weight's original dtype). Raises, leaving the model
    unchanged, if a key is unknown or a shape does not fit.
    """
    state_dict = load_file(str(Path(source))) if not isinstance(source, dict) else source
    layers = {prefix: _layer(model, prefix, state_dict, compute_dtype) for prefix in _quantized_prefixes(state_dict)}
    _check_keys(model, layers, state_dict)
    for prefix, layer in layers.items():
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    model.load_state_dict(state_dict, strict=False)  # every key was checked above; tied copies may be absent
    return model


def _quantized_prefixes(state_dict: dict[str, Tensor]) -> list[str]:
    return sorted({key.split(QUANT_STATE_KEY)[0] for key in state_dict if QUANT_STATE_KEY in key})


def _layer(model: nn.Module, prefix: str, state_dict: dict[str, Tensor],
           compute_dtype: torch.dtype | None) -> Linear4bit:
    """A ``Linear4bit`` built from the checkpoint's tensors for the module at ``prefix``."""
    try:
        module = model.get_submodule(prefix)
    except AttributeError as err:
        raise QuantError(f"the checkpoint quantizes {prefix!r}, which this model does not have") from err
    inner = {k[len(prefix) + len(".weight."):]: v for k, v in state_dict.items() if k.startswith(f"{prefix}.weight.")}
    try:
        state = read_state(inner)
    except (ValueError, KeyError) as err:
        raise QuantError(f"{prefix}: the quantization state cannot be read ({err})") from err
    out_in = _dense_shape(module)
    if out_in is not None and out_in != state.shape:
        raise QuantError(f"{prefix}: the checkpoint's weight is {list(state.shape)} (out, in), the model's "
                         f"{list(out_in)}; the checkpoint belongs to another model configuration")
    packed = state_dict[f"{prefix}.weight"]
    bias = state_dict.get(f"{prefix}.bias")
    return Linear4bit(packed.clone(), state, None if bias is None else bias.clone(), compute_dtype)


def _dense_shape(module: nn.Module) -> tuple[int, ...] | None:
    if isinstance(module, Linear4bit):
        return (module.out_features, module.in_features)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    return tuple(weight.shape) if isinstance(module, nn.Linear) else tuple(weight.shape[::-1])


def _check_keys(model: nn.Module, layers: dict[str, Linear4bit], state_dict: dict[str, Tensor]) -> None:
    """Every checkpoint key must name a tensor of the (converted) model with the same shape."""
    expected: dict[str, tuple[int, ...]] = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(f"{p}.") for p in layers):
            expected[key] = tuple(value.shape)
    for prefix, layer in layers.items():
        expected.update({f"{prefix}.{k}": tuple(v.shape) for k, v in layer.state_dict().items()})
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise QuantError(f"the checkpoint has keys this model lacks: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    bad = [f"{k}: checkpoint {list(v.shape)} vs model {list(expected[k])}" for k, v in state_dict.items()
           if tuple(v.shape) != expected[k]]
    if bad:
        raise QuantError(f"shape mismatch: {bad[:5]}")
