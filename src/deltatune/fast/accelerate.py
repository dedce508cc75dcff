"""Swap a supported model's frozen-base computations for fused ones, exactly reversibly.

Each patch replaces the ``forward`` of one module instance (never the class), so ``restore``
only has to delete the instance attribute, and models of the same class elsewhere in the
process are untouched. Supported: the LLaMA family as transformers implements it (LLaMA,
Mistral, Qwen2, Qwen3) and GPT-2: the causal-LM loss over the vocabulary (``causal_lm``), the
RMSNorm layers (``rms_norm``) and GPT-2's tanh GELU (``gelu``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .. import hf
from ..errors import TargetError
from .causal_lm import fused_loss_forward
from .gelu import GELU_TANH_CLASSES, fused_gelu_forward
from .rms_norm import fused_rms_norm_forward

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""Classes computing exactly ``weight * x * rsqrt(mean(x²) + variance_epsilon)``."""
MODULE_PATCHES: dict[str, Callable[[nn.Module], Callable[..., Any]]] = {
    **dict.fromkeys(RMS_NORMS, fused_rms_norm_forward),
    **dict.fromkeys(GELU_TANH_CLASSES, fused_gelu_forward),
}
"""Module class name -> the builder of its fused forward."""
_PATCHED = "_deltatune_fast"


def accelerate(model: nn.Module) -> nn.Module:
    """Make ``model`` (a supported transformers model) compute its frozen parts with fused kernels.

    Results equal the stock model's within fp32 rounding (tested by parity). With ``labels``, a
    causal LM returns the loss and ``logits=None``: the logits over the vocabulary are never
    built. Call it before or after ``dt.attach``; undo with ``restore``. Returns ``model``.
    """
    kind = hf.model_type(model)
    if kind not in SUPPORTED:
        raise TargetError(
            f"dt.accelerate supports the model types {SUPPORTED}, got {kind!r} ({type(model).__name__}). "
            "Fix: train without it (everything else works the same), or use a LLaMA-family or GPT-2 model."
        )
    for module, forward in _patches(model):
        _install(module, forward)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every module computes with its class's own forward again."""
    for module in model.modules():
        if module.__dict__.pop(_PATCHED, False):
            module.__dict__.pop("forward", None)
    return model


def _patches(model: nn.Module) -> list[tuple[nn.Module, Callable[..., Any]]]:
    """The modules to patch and their new forwards."""
    found: list[tuple[nn.Module, Callable[..., Any]]] = []
    prefix = getattr(model, "base_model_prefix", "")
    if hasattr(model, "lm_head") and hasattr(model, prefix) and not _has_softcap(model):
        found.append((model, fused_loss_forward(model)))
    found += [(m, MODULE_PATCHES[type(m).__name__](m)) for m in model.modules()
              if type(m).__name__ in MODULE_PATCHES]
    return found


def _has_softcap(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None


def _install(module: nn.Module, forward: Callable[..., Any]) -> None:
    if module.__dict__.get(_PATCHED):
        return  # already accelerated: keep the first patch (its stock forward is the class's)
    module.__dict__["forward"] = forward
    module.__dict__[_PATCHED] = True
