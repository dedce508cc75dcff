"""The only place that knows torch layer types.

Every adaptable layer is seen through a ``BaseLayer``: its input and output sizes, its dense
weight in one canonical layout ``(out, in, *kernel)`` (so GPT-2's transposed ``Conv1D`` and an
embedding table look like any linear map), and the two operations a low-rank method needs:
``project`` (apply a ``(r, in, *kernel)`` weight the way the layer applies its own) and
``expand`` (add a pointwise ``(out, r)`` map of a hidden tensor into the layer's output).
Methods build on these and never ask which torch class they are wrapping. Other kinds register
themselves (``register_base_kind``): the 4-bit base of ``quant`` is read as its dequantized weight;
it cannot be written in place, so merging it builds a new module (``merged_module``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hf
from .errors import AdapterError


class BaseLayer(ABC):
    """A view of one torch layer; subclasses say how to read it. Holds no state of its own."""

    kind: ClassVar[str] = ""
    """"linear" (also Conv1D and later 4-bit linear), "embedding" or "conv"."""
    fan_in_fan_out: ClassVar[bool] = False
    """Whether the stored weight is ``(in, out)``; peft records this in adapter_config.json."""
    dense_linear: ClassVar[bool] = False
    """Whether forward is exactly ``F.linear(x, read_weight(), bias)`` with a stored dense weight,
    so a method may compute the whole layer in one fused function (see ``layer.FUSED_FORWARD``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @staticmethod
    @abstractmethod
    def accepts(module: nn.Module) -> bool:
        """Whether this kind describes ``module``."""

    @property
    @abstractmethod
    def in_features(self) -> int:
        """Input size (channels for conv, vocabulary size for embeddings)."""

    @property
    @abstractmethod
    def out_features(self) -> int:
        """Output size (channels for conv, embedding dim for embeddings)."""

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return ()

    @property
    def weight(self) -> Tensor:
        """The stored weight parameter (layout is the layer's own; use read_weight for math)."""
        return self.module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        """The layer's bias ``(out,)``, or None."""
        bias = getattr(self.module, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    def write_bias(self, bias: Tensor) -> None:
        """Overwrite the bias in place (only called when the layer has one)."""
        assert self.bias is not None
        with torch.no_grad():
            self.bias.copy_(bias.to(self.bias.dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes in (the dtype of ``read_weight()``)."""
        return self.weight.dtype

    def read_weight(self) -> Tensor:
        """The dense weight in the canonical ``(out, in, *kernel)`` layout (a view where possible)."""
        return self.weight

    def check_writable(self) -> None:
        """Raise if ``write_weight`` cannot hold an arbitrary dense weight exactly (checked before changes)."""

    def write_weight(self, canonical: Tensor) -> None:
        """Overwrite the weight in place (keeping the Parameter object, so ties and optimizers hold)."""
        with torch.no_grad():
            self.weight.copy_(self._to_stored(canonical).to(self.weight.dtype))

    def merged_module(self, canonical: Tensor | None, bias: Tensor | None, requantize: bool) -> nn.Module:
        """The plain module that replaces this layer when adapters are unloaded with merging.

        ``canonical`` is the merged dense weight (fp32), or None when nothing is folded into this
        layer; ``bias`` the merged bias, if it changed. A dense layer takes both in place and is
        returned; a quantized kind returns a new module (see ``Linear4bitBase``).
        """
        if canonical is not None:
            self.write_weight(canonical)
        if bias is not None:
            self.write_bias(bias)
        return self.module

    def _to_stored(self, canonical: Tensor) -> Tensor:
        return canonical

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        """Apply a ``(r, in, *kernel)`` weight to the layer input as the layer applies its own."""
        return F.linear(x, weight)

    def expand(self, y: Tensor, h: Tensor, weight: Tensor, scale: float) -> Tensor:
        """``y + (h mapped by the (out, r) weight) * scale``, returned in y's dtype."""
        return add_scaled(y, self.mapped(h, weight), scale)

    def mapped(self, h: Tensor, weight: Tensor) -> Tensor:
        """A hidden tensor ``h`` mapped to the layer's output by a pointwise ``(out, r)`` weight."""
        return F.linear(h, weight)

    def describe(self) -> str:
        return f"{type(self.module).__name__}({self.in_features} -> {self.out_features})"


class LinearBase(BaseLayer):
    kind = "linear"
    dense_linear = True

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class _StoredTransposed(BaseLayer):
    """A layer whose weight is stored ``(in, out)``: read and written transposed."""

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def read_weight(self) -> Tensor:
        return self.weight.t()

    def _to_stored(self, canonical: Tensor) -> Tensor:
        return canonical.t()


class Conv1DBase(_StoredTransposed):
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as ``(in, out)``."""

    kind = "linear"
    fan_in_fan_out = True
    dense_linear = True

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        conv1d = hf.conv1d_class()
        return conv1d is not None and isinstance(module, conv1d)


class EmbeddingBase(_StoredTransposed):
    """An embedding table seen as a linear map from one-hot ids: canonical ``(dim, num_embeddings)``."""

    kind = "embedding"

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        m: nn.Embedding = self.module  # type: ignore[assignment]
        return F.embedding(x, weight.t(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


class ConvBase(BaseLayer):
    """``nn.Conv1d/2d/3d`` with zero padding and groups=1; the channel axis is dim 1."""

    kind = "conv"
    _functions: ClassVar[dict[int, Callable[..., Tensor]]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1
                and module.padding_mode == "zeros")

    @property
    def in_features(self) -> int:
        return self.module.in_channels  # type: ignore[return-value]

    @property
    def out_features(self) -> int:
        return self.module.out_channels  # type: ignore[return-value]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.module.kernel_size)  # type: ignore[arg-type]

    def _conv(self) -> Callable[..., Tensor]:
        return self._functions[len(self.kernel_size)]

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        return self._conv()(x, weight, None, m.stride, m.padding, m.dilation)

    def mapped(self, h: Tensor, weight: Tensor) -> Tensor:
        pointwise = weight.reshape(*weight.shape[:2], *(1,) * len(self.kernel_size))
        return self._conv()(h, pointwise)


class ParameterBase(BaseLayer):
    """One parameter of a module, adapted directly (peft's ``target_parameters``): a 2-D weight
    ``(out, in)``, or a 3-D stack of experts' weights ``(experts, out, in)`` (``(experts, in, out)``
    where the module says ``is_transposed``, as peft reads it). The canonical layout is the stored one.

    The module computes with the parameter in its own forward (a loop over experts), so a change
    cannot be added to its output: ``param_site.ParameterLayer`` substitutes ``W + ΔW`` for the
    parameter during the module's call instead. There is no activation map, so ``project`` and
    ``mapped`` are refused.
    """

    kind = "parameter"

    def __init__(self, module: nn.Module, name: str, path: str) -> None:
        super().__init__(module)
        self.name = name
        self.path = path
        """The parameter's full name as the user sees it (``model.layers.0.mlp.experts.down_proj``)."""

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return False  # a parameter site is chosen by parameter name, never by module type

    @property
    def weight(self) -> Tensor:
        stored = self.module._parameters[self.name]  # the Parameter itself, also while a change is substituted
        assert stored is not None
        return stored

    @property
    def bias(self) -> Tensor | None:
        return None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0] if self.weight.dim() == 3 else 1

    @property
    def transposed(self) -> bool:
        """Whether each expert's matrix is stored ``(in, out)``."""
        return self.weight.dim() == 3 and bool(getattr(self.module, "is_transposed", False))

    @property
    def in_features(self) -> int:
        return self.weight.shape[-2] if self.transposed else self.weight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1] if self.transposed else self.weight.shape[-2]

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        raise AdapterError(f"{self.describe()} is a parameter, not a layer: a change to it is a change of the "
                           "parameter (W + ΔW during the module's call), never a map of the module's input")

    def mapped(self, h: Tensor, weight: Tensor) -> Tensor:
        return self.project(h, weight)

    def describe(self) -> str:
        return f"parameter {self.path} {tuple(self.weight.shape)} of {type(self.module).__name__}"


def add_scaled(y: Tensor, z: Tensor, scale: float) -> Tensor:
    """``y + z * scale`` in y's dtype, in the order peft computes it, so outputs match peft's bit
    for bit; ``z`` is a fresh tensor that autograd does not keep, so it is reused in place
    (two fewer full-size allocations than the out-of-place expression)."""
    z = z.mul_(scale)
    if z.dtype == y.dtype:
        return z.add_(y)
    return (y + z).to(y.dtype)  # half-precision base, fp32 adapter: sum in fp32 as peft does


BASE_KINDS: list[type[BaseLayer]] = [LinearBase, Conv1DBase, EmbeddingBase, ConvBase]
"""Checked in order. Kinds defined elsewhere (``quant``'s 4-bit linear) add themselves."""


def register_base_kind(kind: type[BaseLayer]) -> None:
    """Make ``base_layer_for`` see layers of another kind (checked after the built-in ones)."""
    if kind not in BASE_KINDS:
        BASE_KINDS.append(kind)


def base_layer_for(module: nn.Module) -> BaseLayer | None:
    """The view of ``module`` if deltatune can adapt it, else None."""
    for kind in BASE_KINDS:
        if kind.accepts(module):
            return kind(module)
    return None


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` counts as a linear layer for ``target_modules="all-linear"``."""
    view = base_layer_for(module)
    return view is not None and view.kind == "linear"


CHANNELS_FIRST: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                                               nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def channel_dim(module: nn.Module) -> int:
    """The output dimension a module's bias runs along: 1 for convolutions and batch/group/instance
    norms (``(N, C, ...)``), the last one otherwise (linear layers, layer norms, embeddings)."""
    return 1 if isinstance(module, CHANNELS_FIRST) else -1
