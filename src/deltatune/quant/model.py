"""``quantize(model, config)``: replace a model's linear layers by ``Linear4bit`` in place.

Every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2; its ``(in, out)`` weight is transposed
first, as transformers does when it loads GPT-2 in 4 bits) is quantized, except the modules the
config skips (by default the output head). The replacements are all built before the first one
is swapped in, so a failure leaves the model as it was; a weight holding NaN or inf is refused
(it would turn its whole layer to NaN). ``prepare_for_training`` then does what
peft's ``prepare_model_for_kbit_training`` does for a frozen 4-bit base: freeze every
parameter, keep unquantized parameters (norms above all) in fp32, and make the
input embeddings' output require grad, because gradient checkpointing only recomputes segments
whose inputs require grad and a frozen embedding gives none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import hf
from ..errors import QuantError
from ..state import STATE_ATTR
from .config import INT4_GROUP, QuantConfig
from .int4_group import check_group_size
from .int4_linear import Int4GroupLinear
from .linear import Linear4bit


def packed_weight_values(model: nn.Module) -> int:
    """How many weight values ``model``'s 4-bit layers hold: their packed codes are buffers, not
    parameters, so a parameter count misses them (a QLoRA model would look a quarter of its size)."""
    return sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, (Linear4bit, Int4GroupLinear)))


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Quantize ``model``'s linear layers to 4 bits in place (see the module docstring); returns the model."""
    config = config or QuantConfig()
    if STATE_ATTR in model.__dict__:
        raise QuantError("this model already has deltatune adapters; quantize the base first, then attach "
                         "(dt.quantize(model, ...); dt.attach(model, ...))")
    skip = config.skip_modules
    if skip is None:
        head = hf.output_head_name(model, None)
        skip = (head,) if head else ()
    # Modules the architecture computes in fp32 (T5's feed-forward output casts its input to that
    # weight's dtype), as transformers' own quantizers keep them.
    skip = (*skip, *sorted(set(getattr(model, "_keep_in_fp32_modules", None) or ()) - set(skip)))
    targets = {name: module for name, module in model.named_modules()
               if _is_dense_linear(module) and not _skipped(name, skip)}
    if not targets:
        raise QuantError(f"quantize found no linear layer to quantize (skip_modules={list(skip)}); "
                         "the model has no nn.Linear or transformers Conv1D outside the skipped modules")
    for name, module in targets.items():  # every layer before quantizing any: a bad one fails fast
        _check_finite(name, module.weight, skip)
    new = {name: _quantized(name, module, config) for name, module in targets.items()}
    for name, layer in new.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    if config.prepare_for_training:
        prepare_for_training(model)
    return model


def _is_dense_linear(module: nn.Module) -> bool:
    conv1d = hf.conv1d_class()
    return type(module) is nn.Linear or (conv1d is not None and isinstance(module, conv1d))


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """``name`` is a skipped module or lies inside one (a skipped ``pooler`` keeps ``pooler.dense``
    dense), wherever the skipped name sits in the model's tree."""
    return any(f".{s}." in f".{name}." for s in skip)


def _check_finite(name: str, weight: Tensor, skip: tuple[str, ...]) -> None:
    """Refuse NaN/inf: a block's absmax scales all its values, and double quantization shares
    scales across blocks, so one inf turns thousands of weights into NaN, silently."""
    bad = ~torch.isfinite(weight.detach())
    count = int(bad.sum())
    if count == 0:
        return
    flat = int(bad.reshape(-1).nonzero()[0])
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), weight.shape)]
    value = weight.detach().reshape(-1)[flat].item()
    raise QuantError(
        f"cannot quantize {name!r}: its weight (shape {list(weight.shape)}) holds {count} non-finite "
        f"value{'s' if count > 1 else ''}, the first {value} at weight{index}; quantizing would spread NaN over "
        "the layer. Nothing was changed. Fix: load or repair finite weights (check for an fp16 overflow), "
        f"or leave the layer dense with QuantConfig(skip_modules={[*skip, name]})")


def _quantized(name: str, module: nn.Module, config: QuantConfig) -> Linear4bit | Int4GroupLinear:
    weight: Tensor = module.weight  # type: ignore[assignment]
    if not isinstance(module, nn.Linear):
        weight = weight.t()  # Conv1D stores (in, out)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QuantError(f"{name}: weight dtype {weight.dtype} cannot be quantized to 4 bits; cast the model to "
                         "float32, float16 or bfloat16 first")
    bias: Any = getattr(module, "bias", None)
    if config.quant_type == INT4_GROUP:
        return _int4_group(name, weight, bias if isinstance(bias, Tensor) else None, config, module.training)
    layer = Linear4bit.from_weight(weight, bias if isinstance(bias, Tensor) else None, config.quant_type,
                                   config.blocksize, config.double_quant, config.compute_dtype, config.quant_storage)
    layer.train(module.training)
    return layer


def _int4_group(name: str, weight: Tensor, bias: Tensor | None, config: QuantConfig,
                training: bool) -> Int4GroupLinear:
    problem = check_group_size(weight.shape[1], config.group_size)
    if problem is not None:
        raise QuantError(f"cannot quantize {name!r} to int4_group: {problem}. Nothing was changed. Fix: pass a "
                         "group_size that divides every quantized layer's input size, or skip this layer with "
                         f"QuantConfig(skip_modules=[..., {name!r}])")
    layer = Int4GroupLinear.from_weight(weight, bias, config.group_size, config.compute_dtype)
    layer.train(training)
    return layer


def prepare_for_training(model: nn.Module) -> None:
    """Freeze the base, keep unquantized parameters in fp32, and enable input gradients.

    As in peft's ``prepare_model_for_kbit_training``, every fp16/bf16 parameter left unquantized
    (norms, embeddings, the output head, biases) goes to fp32: norms need the precision, and one
    dtype for the whole residual stream avoids mixed-dtype matmuls (each 4-bit layer casts its
    input to the compute dtype and its output back).
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()  # .data keeps the Parameter object, so ties hold
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Module):
        embeddings.register_forward_hook(_require_grad)


def _require_grad(module: nn.Module, inputs: Any, output: Tensor) -> None:
    output.requires_grad_(True)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every ``Linear4bit`` and ``Int4GroupLinear`` of ``model`` by a dense ``nn.Linear`` in its compute
    dtype, in place."""
    from .merge import dense_linear

    for name, module in list(model.named_modules()):
        if isinstance(module, (Linear4bit, Int4GroupLinear)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense_linear(module, None, None))
    return model
