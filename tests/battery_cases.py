"""The tables behind the invariant battery (test_invariants.py): base kinds, methods, dtypes.

A base kind is one torch layer, built as a one-layer model (``Single``, the layer under the name
``layer``) so that every output is that layer's output. A method row holds everything the battery
knows about a method: its config, the kinds it adapts, its dense formula (the fp64 oracle), its
parameter count and the capabilities that decide which invariants apply to it. Nothing else in the
battery names a method. Method test files import the kinds and helpers from here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.io import adapter_tensors
from deltatune.layer import DeltaLayer
from deltatune.quant import Linear4bit
from deltatune.state import state_of

R = 4
ALPHA = 8.0
DTYPES = [torch.float32, torch.bfloat16]


class Single(nn.Module):
    """A model made of one layer, so every output is that layer's output."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


# ------------------------------------------------------------------------------------ base kinds

@dataclass(frozen=True, repr=False)
class Kind:
    """One base layer type: how to build it and feed it, and how its weight maps to the canonical
    ``(out, in, *kernel)`` layout."""

    name: str
    make: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], Tensor]
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    transposed: bool = False
    """Stored ``(in, out)``: GPT-2's Conv1D, an embedding table seen as a map from one-hot ids, and an
    expert stack stored ``(experts, in, out)``."""
    dense_linear: bool = False
    """Forward is one ``F.linear(x, W, b)`` on a stored dense weight (Linear, Conv1D)."""
    peft_runs: bool = True
    """peft can run the layer: its LoRA convs are built without the base's dilation, so a dilated
    conv fails in peft 0.21 (test_peft_parity's ConvNet covers an undilated Conv1d)."""
    quantized: bool = False
    """Stored in 4 bits (``dt.quantize``): nothing merges in place, and peft's 4-bit layers are
    bitsandbytes modules, so peft cross-loads are checked on the dense base (test_quant_lora.py)."""

    def __repr__(self) -> str:  # test reports name the kind, not its builders
        return f"Kind({self.name})"

    def canonical(self, stored: Tensor) -> Tensor:
        """Stored layout -> canonical layout (an expert stack: each expert's matrix); its own inverse."""
        return stored.transpose(-2, -1) if self.transposed else stored


class Experts(nn.Module):
    """A fused mixture-of-experts weight as transformers 5 stores it: one ``(experts, out, in)``
    parameter (``(experts, in, out)`` with ``is_transposed``, as GPT-OSS), which the module reads in
    its own forward. Token ``t`` of every row goes to expert ``t mod experts`` (a fixed routing, so
    each expert's change shows in the output); no bias."""

    def __init__(self, experts: int, in_features: int, out_features: int, is_transposed: bool = False) -> None:
        super().__init__()
        shape = (experts, in_features, out_features) if is_transposed else (experts, out_features, in_features)
        self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(in_features))
        self.is_transposed = is_transposed

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.transpose(-2, -1) if self.is_transposed else self.weight  # (experts, out, in)
        picked = weight[torch.arange(x.shape[-2], device=x.device) % weight.shape[0]]  # one expert per token
        return torch.einsum("bti,toi->bto", x, picked)


def _ids(g: torch.Generator) -> Tensor:
    ids = torch.randint(0, 20, (3, 7), generator=g)
    ids[0, :2] = 0  # padding_idx rows are looked up too
    return ids


def _tokens(g: torch.Generator) -> Tensor:
    return torch.randn(3, 5, 16, generator=g)


KINDS = [
    Kind("linear", lambda: nn.Linear(16, 12), _tokens, 16, 12, dense_linear=True),
    Kind("gpt2_conv1d", lambda: Conv1D(nf=12, nx=16), _tokens, 16, 12, transposed=True, dense_linear=True),
    Kind("embedding", lambda: nn.Embedding(20, 12, padding_idx=0), _ids, 20, 12, transposed=True),
    Kind("conv1d", lambda: nn.Conv1d(6, 8, kernel_size=3, padding=2, dilation=2),
         lambda g: torch.randn(2, 6, 11, generator=g), 6, 8, (3,), peft_runs=False),
    Kind("conv2d", lambda: nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
         lambda g: torch.randn(2, 3, 9, 9, generator=g), 3, 8, (3, 3)),
    Kind("conv2d_1x1", lambda: nn.Conv2d(6, 8, kernel_size=1), lambda g: torch.randn(2, 6, 5, 5, generator=g),
         6, 8, (1, 1)),
    Kind("conv3d", lambda: nn.Conv3d(2, 4, kernel_size=(1, 3, 2), padding=1),
         lambda g: torch.randn(2, 2, 3, 5, 4, generator=g), 2, 4, (1, 3, 2)),
    Kind("linear4bit", lambda: nn.Linear(16, 12), _tokens, 16, 12, quantized=True),
    Kind("layernorm", lambda: nn.LayerNorm(12), lambda g: torch.randn(3, 5, 12, generator=g), 12, 12),
    Kind("experts", lambda: Experts(3, 16, 12), _tokens, 16, 12),
    Kind("experts_transposed", lambda: Experts(3, 16, 12, is_transposed=True), _tokens, 16, 12, transposed=True),
]
KIND = {k.name: k for k in KINDS}


def build(kind: Kind, dtype: torch.dtype, seed: int = 0) -> Single:
    """The base model; the same for the same seed, so a "fresh base" equals the original."""
    # only the CPU generator: torch.manual_seed also queues CUDA/XPU/MTIA seeding, which records a
    # stack trace per call, and that alone was a third of this battery's run time
    torch.default_generator.manual_seed(seed)
    layer = kind.make()
    bias = getattr(layer, "bias", None)
    if isinstance(bias, nn.Parameter):
        with torch.no_grad():
            bias.normal_()  # Conv1D and LayerNorm start at zero, which would hide a change of the bias
    model = Single(layer).to(dtype).eval()
    if kind.quantized:
        dt.quantize(model, dt.QuantConfig(compute_dtype=dtype))
    return model


def make_input(kind: Kind, dtype: torch.dtype) -> Tensor:
    x = kind.make_input(torch.Generator().manual_seed(7))
    return x.to(dtype) if x.is_floating_point() else x


@torch.no_grad()
def run(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def base_module(model: nn.Module) -> nn.Module:
    """The layer's torch module, whether or not it is wrapped."""
    return model.layer.base_layer if isinstance(model.layer, DeltaLayer) else model.layer


def wrapper(model: nn.Module) -> DeltaLayer:
    assert isinstance(model.layer, DeltaLayer)
    return model.layer


def delta_of(model: nn.Module, name: str = "default") -> Any:
    return wrapper(model).deltas[name]


def canonical_weight(kind: Kind, module: nn.Module) -> Tensor:
    """The layer's weight in the canonical layout, fp64 (a 4-bit weight dequantized)."""
    weight = module.dequantize() if isinstance(module, Linear4bit) else kind.canonical(module.weight)
    return weight.detach().double()


def dense_copy(module: nn.Module) -> nn.Module:
    """The layer as a plain fp64 torch module (a 4-bit layer as the Linear of its dequantized weight)."""
    if isinstance(module, Linear4bit):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(module.dequantize())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        return dense.double()
    return copy.deepcopy(module).double()


# --------------------------------------------------------------------------------------- methods

Oracle = Callable[[nn.Module, Any, Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]
"""(adapted model, its config, canonical fp64 W, fp64 bias) -> the (W', bias') the method promises."""


@dataclass(frozen=True, repr=False)
class Method:
    """Everything the battery knows about one method (a config setting with its own behaviour)."""

    name: str
    config_class: type[dt.DeltaConfig]
    kwargs: Mapping[str, Any]
    """Fields for deltatune's config and, under the same names, for peft's config class."""
    kinds: tuple[str, ...]
    """The base kinds the method adapts; attaching to any other is refused."""
    count: Callable[[Kind], int]
    """Trained parameters on one layer."""
    oracle: Oracle
    peft: str | None = None
    """peft's config class for the method (None: peft has no such method); peft adapts the same
    dense kinds."""
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({"default": {}}))
    """Config changes that keep the identity init; the identity and oracle checks run each one."""
    scales: tuple[str, ...] = ()
    """Trained tensors that multiply (key substrings, deltatune's and peft's): randomized by a
    positive factor, as training keeps them near their init of ones / ||W||."""
    gain: Callable[[nn.Module, Any, Tensor], Tensor] | None = None
    """How much unmerge amplifies an error in the merged weight (canonical layout): merge scales
    W and unmerge divides by that scale; None for a change added to W (gain 1)."""
    merges_bias: bool = False
    """Merging changes the bias too (IA3's output scaling); every other merge leaves it untouched."""
    layer_delta: bool = True
    """The change lives in a wrapper of the layer; False for BitFit, which hooks the module's output."""
    trains_base_tensors: bool = False
    """Whether the adapter trains copies of base tensors, kept in the base's dtype (BitFit's biases)."""
    fused_identity_rounds: bool = False
    """DoRA: on a dense linear fp32 base its fused kernel adds the bias after ``x Wᵀ`` while the base
    adds it inside one addmm, so its identity holds up to that rounding, not bit for bit."""
    site: str = "layer"
    """Where the change lives: "layer" (a wrapper adds to the layer's output or merges into its
    weight) or "parameter" (``target_parameters``: the module computes with ``W + ΔW`` in the
    parameter's place). A module carries changes of one site only (the other is refused,
    test_lora_moe.py), so pairs are formed within a site. At a parameter site the module computes
    with ``W + ΔW`` stored in the base's dtype (peft's ParamWrapper), so the adapter has the base's
    precision: its outputs are compared by ``weight_rounding_bound``, not by TOLERANCES, whose
    premise of order-one terms a bf16 ``W + ΔW`` of order one breaks (measured: errors up to
    1.6 u Σ|W' x|, 0.032 on the Conv1D kind with rsLoRA against TOLERANCES' 0.02)."""
    start: Callable[[Tensor, torch.dtype], Tensor] | None = None
    """The base weight attach leaves, from the original (canonical fp64, the layer's dtype) to fp64;
    None: attach keeps W. LoftQ replaces W by its NF4 round trip. "The base" of the disabled and
    oracle checks is then this weight; a 4-bit base is never rewritten (the function must keep it)."""
    refused: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    """Config changes the method refuses, by name: a ConfigError when the config is built or a
    TargetError when it is attached to one of its kinds, the base left as it was."""
    init: Callable[[Tensor, torch.dtype, Any], Tensor] | None = None
    """None: the init is the identity (bit for bit). Else the fp64 formula of the weight the init
    computes with, from the original W, the layer's dtype and the config (LoftQ: NF4(W) plus the best
    rank-r approximation of the quantization error, which is not W by design)."""

    def __repr__(self) -> str:
        return f"Method({self.name})"

    def config(self, **changes: Any) -> dt.DeltaConfig:
        return self.config_class(**copy.deepcopy({**self.kwargs, **changes}))

    def peft_config(self) -> Any:
        import peft

        assert self.peft is not None
        return getattr(peft, self.peft)(**copy.deepcopy(dict(self.kwargs)))


def _f64(t: Tensor) -> Tensor:
    return t.detach().double()


def _rows(v: Tensor, w: Tensor) -> Tensor:
    """A per-output vector laid along the rows of a canonical weight."""
    return v.reshape(-1, *(1,) * (w.dim() - 1))


def _scale(config: Any) -> float:
    return float(config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r))


def _lora_weight(model: nn.Module, config: Any, w: Tensor) -> Tensor:
    d = delta_of(model)
    return w + _scale(config) * (_f64(d.B).flatten(1) @ _f64(d.A).flatten(1)).view(w.shape)


def lora_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``W + s B A``, ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
    return _lora_weight(model, config, w), b


def dora_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``m (W + s B A) / ||W + s B A||``, the norm per output over every other axis."""
    direction = _lora_weight(model, config, w)
    m = _f64(delta_of(model).magnitude).flatten()
    return _rows(m / direction.flatten(1).norm(dim=1), w) * direction, b


def dora_gain(model: nn.Module, config: Any, w: Tensor) -> Tensor:
    """Merge scales row i by ``m_i / ||W + s B A||_i``; unmerge divides by it."""
    direction = _lora_weight(model, config, w)
    return _rows(direction.flatten(1).norm(dim=1) / _f64(delta_of(model).magnitude).flatten().abs(), w)


def _ia3_scale(model: nn.Module, w: Tensor, along_input: bool) -> Tensor:
    l = _f64(delta_of(model).ia3_l).flatten()
    return l.reshape(1, -1, *(1,) * (w.dim() - 2)) if along_input else _rows(l, w)


def ia3_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Output scaling: ``diag(l) W``, ``l * b``."""
    l = _ia3_scale(model, w, along_input=False)
    return l * w, None if b is None else l.flatten() * b


def ia3_ff_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Input scaling (feed-forward): ``W diag(l)``, the bias unchanged."""
    return w * _ia3_scale(model, w, along_input=True), b


def vera_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``W + diag(b) B diag(d) A`` with the shared pair sliced to the layer."""
    d = delta_of(model)
    a = _f64(d.projection.vera_A)[:, : w.shape[1]]
    bb = _f64(d.projection.vera_B)[: w.shape[0]]
    return w + (_f64(d.vera_lambda_b)[:, None] * bb) @ (_f64(d.vera_lambda_d)[:, None] * a), b


def adalora_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``W + alpha / (init_r + 1e-5) P Λ Q``, ``init_r + 1e-5`` rounded to fp32 as peft stores it."""
    d = delta_of(model)
    ranknum = float(torch.tensor(float(config.init_r), dtype=torch.float32) + 1e-5)
    product = _f64(d.lora_B) @ (_f64(d.lora_A) * _f64(d.lora_E))
    return w + (config.lora_alpha / ranknum * product).view(w.shape), b


def bitfit_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The weight as it is; the trained copy as the bias."""
    (bias,) = state_of(model).model_deltas["default"].biases
    return w, _f64(bias)


def qalora_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """QA-LoRA: ``W + s (n / G) B A`` with A's ``n = in / G`` columns each repeated over its group of
    G inputs (peft's pooling: the mean of each group times n)."""
    d = delta_of(model)
    group = config.qalora_group_size
    groups = w.shape[1] // group
    return w + _scale(config) * groups / group * (_f64(d.B) @ _f64(d.A)).repeat_interleave(group, dim=1), b


def parameter_lora_oracle(model: nn.Module, config: Any, w: Tensor, b: Tensor | None
                          ) -> tuple[Tensor, Tensor | None]:
    """LoRA on a parameter: expert ``e`` of an ``E``-expert stack gets ``s B_e A_e`` with A's rows
    ``e r … e r + r - 1`` and B's columns ``e, E + e, 2E + e, …`` (peft's split), as ``(out, in)``;
    a 2-D parameter is one expert whose change is ``s B A`` in the stored layout."""
    d = delta_of(model)
    stored = wrapper(model).view.weight
    experts = stored.shape[0] if stored.dim() == 3 else 1
    a, bb = _f64(d.A), _f64(d.B)
    change = torch.stack([bb[:, e::experts] @ a[e * config.r:(e + 1) * config.r] for e in range(experts)])
    change = _scale(config) * (change if stored.dim() == 3 else change[0])  # (out, in) per expert
    if stored.dim() == 2:  # the stored layout is the parameter's (out, in); w may be its transpose
        assert stored.shape[0] != stored.shape[1], "a square 2-D parameter would hide its layout"
        change = change if tuple(w.shape) == tuple(stored.shape) else change.t()
    return w + change, b


def nf4_start(w: Tensor, dtype: torch.dtype) -> Tensor:
    """LoftQ's base: the NF4 round trip of the fp32 weight (bitsandbytes' blocks of 64 without double
    quantization; test_loftq.py checks the format against bitsandbytes and peft bit for bit), stored
    in the layer's dtype."""
    from deltatune.methods.lora_loftq import nf4_round_trip

    return nf4_round_trip(w.float()).to(dtype).double()


def loftq_init(w: Tensor, dtype: torch.dtype, config: Any) -> Tensor:
    """One LoftQ iteration: ``NF4(W) + s U_r S_r V_rᵀ``, the best rank-r approximation (fp64 SVD) of
    the error ``W - NF4(W)`` of the fp32 weight (peft approximates it by ``B A``, so the init is
    closest to W at ``s = 1``)."""
    from deltatune.methods.lora_loftq import nf4_round_trip

    quantized = nf4_round_trip(w.float()).double()
    u, s, vh = torch.linalg.svd(w - quantized, full_matrices=False)
    r = config.r
    return nf4_start(w, dtype) + _scale(config) * (u[:, :r] * s[:r]) @ vh[:r]


def _prod(kind: Kind) -> int:
    return kind.in_features * math.prod(kind.kernel)


def _expert_units(kind: Kind) -> int:
    """``E (out + in)`` of the kind's weight seen as a parameter (a 2-D weight: one expert)."""
    shape = kind.make().weight.shape
    return (shape[0] if len(shape) == 3 else 1) * (shape[-2] + shape[-1])


DENSE = ("linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "conv2d_1x1", "conv3d")
TARGET = {"target_modules": ["layer"]}
LORA = {"r": R, "lora_alpha": ALPHA, **TARGET}
GROUP = 4
"""QA-LoRA's group size: the battery's linear layers have 16 inputs, 4 groups."""

METHODS = [
    Method("lora", dt.LoraConfig, LORA, (*DENSE, "linear4bit"), lambda k: R * (_prod(k) + k.out_features),
           lora_oracle, peft="LoraConfig",
           variants={"default": {}, "gaussian": {"init_lora_weights": "gaussian"}, "rslora": {"use_rslora": True}}),
    Method("dora", dt.LoraConfig, {**LORA, "use_dora": True}, (*DENSE, "linear4bit"),
           lambda k: R * (_prod(k) + k.out_features) + k.out_features, dora_oracle, peft="LoraConfig",
           variants={"default": {}, "gaussian": {"init_lora_weights": "gaussian"}, "rslora": {"use_rslora": True}},
           scales=("magnitude",), gain=dora_gain, fused_identity_rounds=True),
    Method("ia3", dt.IA3Config, {**TARGET, "feedforward_modules": []},
           ("linear", "gpt2_conv1d", "conv2d", "conv2d_1x1", "conv3d", "linear4bit"), lambda k: k.out_features,
           ia3_oracle, peft="IA3Config", scales=("ia3_l",),
           gain=lambda m, c, w: 1 / _ia3_scale(m, w, along_input=False).abs(), merges_bias=True),
    Method("ia3_ff", dt.IA3Config, {**TARGET, "feedforward_modules": ["layer"]},
           ("linear", "gpt2_conv1d", "conv2d", "conv2d_1x1", "conv3d", "linear4bit"), lambda k: k.in_features,
           ia3_ff_oracle, peft="IA3Config", scales=("ia3_l",),
           gain=lambda m, c, w: 1 / _ia3_scale(m, w, along_input=True).abs()),
    Method("vera", dt.VeraConfig, {"r": R, **TARGET}, ("linear", "gpt2_conv1d", "linear4bit"),
           lambda k: R + k.out_features, vera_oracle, peft="VeraConfig"),
    Method("adalora", dt.AdaLoraConfig, {"init_r": R, "target_r": 2, "lora_alpha": ALPHA, "total_step": 10, **TARGET},
           ("linear", "gpt2_conv1d", "conv2d", "conv2d_1x1", "linear4bit"),
           lambda k: R * (_prod(k) + k.out_features + 1), adalora_oracle, peft="AdaLoraConfig"),
    Method("bitfit", dt.BitFitConfig, TARGET,
           ("linear", "gpt2_conv1d", "conv1d", "conv2d", "conv2d_1x1", "conv3d", "linear4bit", "layernorm"),
           lambda k: k.out_features, bitfit_oracle, layer_delta=False, trains_base_tensors=True),
    # peft applies QA-LoRA to GPTQ layers only: test_qalora.py checks the forward against its
    # QALoraLinearVariant; the lossless 4-bit merge is test_model_battery.py's (an int4_group base)
    Method("qalora", dt.LoraConfig, {**LORA, "use_qalora": True, "qalora_group_size": GROUP},
           ("linear", "gpt2_conv1d", "linear4bit"), lambda k: R * (k.in_features // GROUP + k.out_features),
           qalora_oracle, variants={"default": {}, "gaussian": {"init_lora_weights": "gaussian"},
                                    "rslora": {"use_rslora": True}},
           refused={"dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"},
                    "uneven_groups": {"qalora_group_size": 5}}),
    # alpha = r: s = 1, where LoftQ's start is closest to W. peft's LoftQ quantizes on CUDA only:
    # test_loftq.py checks its factors and model against peft's on the CPU through a patch
    Method("loftq", dt.LoraConfig, {**LORA, "lora_alpha": float(R), "init_lora_weights": "loftq",
                                    "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
           ("linear", "gpt2_conv1d", "linear4bit"), lambda k: R * (_prod(k) + k.out_features), lora_oracle,
           start=nf4_start, init=loftq_init,
           refused={"dora": {"use_dora": True}, "8_bits": {"loftq_config": {"loftq_bits": 8}},
                    "rank_above_min_out_in": {"r": 13}}),
    # a 2-D weight is one expert, a 3-D one a stack (conv1d's (out, in, k): out experts of (in, k)),
    # as in peft; 4-D and 5-D weights, 1-D ones and a 4-bit layer's packed codes are refused
    Method("lora_param", dt.LoraConfig, {"r": R, "lora_alpha": ALPHA, "target_modules": [],
                                         "target_parameters": ["layer.weight"]},
           ("linear", "gpt2_conv1d", "embedding", "conv1d", "experts", "experts_transposed"),
           lambda k: R * _expert_units(k), parameter_lora_oracle, peft="LoraConfig",
           variants={"default": {}, "gaussian": {"init_lora_weights": "gaussian"}, "rslora": {"use_rslora": True}},
           site="parameter",
           refused={"qalora": {"use_qalora": True, "qalora_group_size": GROUP}, "dora": {"use_dora": True},
                    "dropout": {"lora_dropout": 0.1}, "pissa": {"init_lora_weights": "pissa"}}),
]
METHOD = {m.name: m for m in METHODS}


def randomize(model: nn.Module, name: str, method: Method, seed: int = 3) -> None:
    """Seeded noise on every trained tensor of adapter ``name``, so none is at its identity init:
    ``+ 0.3 N(0, 1)``, or a factor ``exp(0.3 N(0, 1))`` for the method's scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in sorted(adapter_tensors(model, name).items()):
            if isinstance(tensor, nn.Parameter):  # not VeRA's frozen projection
                _perturb(key, tensor, method, generator)


def randomize_peft(model: nn.Module, method: Method, seed: int = 3) -> None:
    """The same on a peft model (its trainable adapter tensors; AdaLoRA's ``ranknum`` is a constant
    that peft leaves trainable on a half-precision base and does not save)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if param.requires_grad and "ranknum" not in key:
                _perturb(key, param, method, generator)


def _perturb(key: str, tensor: Tensor, method: Method, generator: torch.Generator) -> None:
    noise = 0.3 * torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
    if any(s in key for s in method.scales):
        tensor.mul_(noise.exp().to(tensor))
    else:
        tensor.add_(noise.to(tensor))


def adapted(method: Method, kind: Kind, dtype: torch.dtype, random: bool = True, **changes: Any) -> nn.Module:
    """The base with the method attached as "default"; by default every trained tensor is random."""
    model = dt.attach(build(kind, dtype), method.config(**changes))
    if random:
        randomize(model, "default", method)
    return model


def starting_base(method: Method, kind: Kind, dtype: torch.dtype) -> Single:
    """The base as the method's attach leaves it (``Method.start``; a 4-bit base is kept)."""
    model = build(kind, dtype)
    if method.start is not None and not kind.quantized:
        module = base_module(model)
        with torch.no_grad():
            module.weight.copy_(kind.canonical(method.start(canonical_weight(kind, module), dtype)))
    return model


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of one rounding to ``dtype``: 2^-24 in fp32, 2^-8 in bf16."""
    return torch.finfo(dtype).eps / 2


TERMS = 64
"""The most terms one output of a battery layer sums (conftest.TOLERANCES: n <= 64)."""


@torch.no_grad()
def weight_rounding_bound(dense: nn.Module, kind: Kind, magnitude: Tensor, x: Tensor, outputs: Tensor,
                          dtype: torch.dtype, roundings: int = 2, paths: int = 1) -> Tensor:
    """How far outputs of a layer computing with ``W + Σ ΔW_i`` stored in ``dtype`` may be from
    their fp64 values, elementwise, to first order: each weight element carries ``roundings``
    roundings of size ``magnitude = |W| + Σ |ΔW_i|`` (canonical fp64; one path with one change:
    the cast of ΔW and the sum, 2), each of ``paths`` computations sums its products in fp32 (at
    most TERMS roundings of size ``Σ magnitude |x|``), and each output is stored once (``outputs``:
    the sum of their absolute values). ``dense``: an fp64 copy of the layer, for ``Σ magnitude |x|``."""
    layer = copy.deepcopy(dense)
    layer.weight.copy_(kind.canonical(magnitude))
    if getattr(layer, "bias", None) is not None:
        layer.bias.zero_()
    sums = layer(x.double().abs() if x.is_floating_point() else x)
    u = unit_roundoff(dtype)
    return (roundings * u + paths * TERMS * unit_roundoff(torch.float32)) * sums + u * outputs


def restore_bound(original: Tensor, merged: Tensor, gain: Tensor | float, dtype: torch.dtype) -> Tensor:
    """How far merge then unmerge may move a weight stored in ``dtype``, elementwise, to first order
    in the unit roundoff (all tensors fp64, in one layout).

    Merging computes ``W' = f(W)`` in fp32 and stores it in ``dtype``; unmerging computes
    ``f⁻¹(W')`` in fp32 and stores that. An error ``e`` in ``W'`` comes back as ``gain * e``
    (unmerge divides by the merge's scale), and the changes themselves (``s B A``, ``l``, ``m`` and
    the norm kept at merge time) are recomputed or kept bit for bit, so they add nothing. The
    roundings: at most three fp32 operations of size ``gain * |W'|`` (DoRA: ``W + s B A`` and the
    scaling in merge, the division in unmerge; the others fewer), the store of ``W'`` (size
    ``|W'|``, reaching W times ``gain``), one fp32 operation of size ``|W|`` (the subtraction or
    the last step) and the store of the result. A store into fp32 is exact.
    """
    u32 = unit_roundoff(torch.float32)
    store = 0.0 if dtype == torch.float32 else unit_roundoff(dtype)
    return gain * merged.abs() * (3 * u32 + store) + original.abs() * (u32 + store)
