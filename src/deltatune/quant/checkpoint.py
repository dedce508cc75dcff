"""Read and write 4-bit checkpoints in the layout transformers + bitsandbytes serialize.

A quantized model's ``state_dict()`` already has that layout (``Linear4bit`` writes it), so
saving is a safetensors file of the state dict. Loading goes the other way for any model built
from its config: every module whose key carries a ``weight.quant_state.bitsandbytes__<type>``
entry becomes a ``Linear4bit`` holding exactly the stored bytes (bit-exact both ways), and the
rest loads as usual. The file is checked completely before the model is touched.

The ``int4_group`` format (``Int4GroupLinear``, e.g. a QA-LoRA adapter merged losslessly into its
base) has no bitsandbytes layout; its state dict is saved as it is: ``<module>.weight`` (packed
uint8 codes, ``(out, in / 2)``), ``<module>.scale`` and ``<module>.offset`` (fp32, ``(out, in / G)``),
and a module holding those three keys with a uint8 weight loads back as an ``Int4GroupLinear``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import QuantError
from .int4_linear import Int4GroupLinear
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
    ``compute_dtype`` (default: the stored weight's original dtype), or by ``Int4GroupLinear`` for
    the int4_group format (default: the replaced module's dtype). Raises, leaving the model
    unchanged, if a key is unknown or a shape does not fit.
    """
    state_dict = load_file(str(Path(source))) if not isinstance(source, dict) else source
    layers: dict[str, nn.Module] = {prefix: _layer(model, prefix, state_dict, compute_dtype)
                                    for prefix in _quantized_prefixes(state_dict)}
    layers.update({prefix: _int4_layer(model, prefix, state_dict, compute_dtype)
                   for prefix in _int4_group_prefixes(state_dict)})
    _check_keys(model, layers, state_dict)
    for prefix, layer in layers.items():
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    model.load_state_dict(state_dict, strict=False)  # every key was checked above; tied copies may be absent
    return model


def _quantized_prefixes(state_dict: dict[str, Tensor]) -> list[str]:
    return sorted({key.split(QUANT_STATE_KEY)[0] for key in state_dict if QUANT_STATE_KEY in key})


def _int4_group_prefixes(state_dict: dict[str, Tensor]) -> list[str]:
    """Modules stored in the int4_group format: a uint8 ``weight`` beside fp32 ``scale`` and ``offset``."""
    prefixes = [key.removesuffix(".offset") for key in state_dict if key.endswith(".offset")]
    return sorted(p for p in prefixes if f"{p}.scale" in state_dict
                  and getattr(state_dict.get(f"{p}.weight"), "dtype", None) == torch.uint8)


def _module(model: nn.Module, prefix: str) -> nn.Module:
    try:
        return model.get_submodule(prefix)
    except AttributeError as err:
        raise QuantError(f"the checkpoint quantizes {prefix!r}, which this model does not have") from err


def _int4_layer(model: nn.Module, prefix: str, state_dict: dict[str, Tensor],
                compute_dtype: torch.dtype | None) -> Int4GroupLinear:
    """An ``Int4GroupLinear`` holding the checkpoint's codes, scales and offsets for the module at ``prefix``,
    computing in ``compute_dtype`` (default: the dtype of the module it replaces, else fp32)."""
    module = _module(model, prefix)
    packed, scale, offset = (state_dict[f"{prefix}.{k}"] for k in ("weight", "scale", "offset"))
    out_features, groups = tuple(scale.shape) if scale.dim() == 2 else (-1, -1)
    in_features = 2 * packed.shape[-1]
    if packed.dim() != 2 or tuple(offset.shape) != tuple(scale.shape) or packed.shape[0] != out_features \
            or groups < 1 or in_features % groups or (in_features // groups) % 2:
        raise QuantError(f"{prefix}: int4_group tensors do not fit together (weight {list(packed.shape)}, scale "
                         f"{list(scale.shape)}, offset {list(offset.shape)}); the checkpoint is damaged")
    out_in = _dense_shape(module)
    if out_in is not None and out_in != (out_features, in_features):
        raise QuantError(f"{prefix}: the checkpoint's weight is {[out_features, in_features]} (out, in), the model's "
                         f"{list(out_in)}; the checkpoint belongs to another model configuration")
    dense = getattr(module, "weight", None)
    dtype = compute_dtype or getattr(module, "compute_dtype", None) or (
        dense.dtype if isinstance(dense, Tensor) and dense.is_floating_point() else torch.float32)
    bias = state_dict.get(f"{prefix}.bias")
    bias = None if bias is None else bias.clone()
    layer = Int4GroupLinear(packed.clone(), scale.clone(), offset.clone(), bias, dtype)
    return layer.train(module.training)


def _layer(model: nn.Module, prefix: str, state_dict: dict[str, Tensor],
           compute_dtype: torch.dtype | None) -> Linear4bit:
    """A ``Linear4bit`` built from the checkpoint's tensors for the module at ``prefix``."""
    module = _module(model, prefix)
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
    if isinstance(module, (Linear4bit, Int4GroupLinear)):
        return (module.out_features, module.in_features)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    return tuple(weight.shape) if isinstance(module, nn.Linear) else tuple(weight.shape[::-1])


def _check_keys(model: nn.Module, layers: dict[str, nn.Module], state_dict: dict[str, Tensor]) -> None:
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
