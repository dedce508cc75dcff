"""MixLoRA: a sparse top-k token router over LoRA experts (Li et al. 2024, "MixLoRA: Enhancing Large
Language Models Fine-Tuning with LoRA-based Mixture of Experts"; per layer as in MoLA, Gao et al. 2024).

Each adapted linear layer holds ``E = num_experts`` LoRA experts ``A_e: (r, in)``, ``B_e: (out, r)``
and a router ``W_r: (E, in)``. For each token ``x``: ``p = softmax(W_r x)``, keep the ``top_k``
largest ``p_e`` and renormalise them to gates ``g_e = p_e / Σ_topk p``; the layer computes
``y = W x + Σ_{e in topk} g_e s B_e A_e dropout(x)`` with ``s = lora_alpha / r``. ``top_k = E`` is the
dense softmax-weighted mixture. The router reads ``x`` without dropout.

One router per adapted layer, not one per feed-forward block as in MixLoRA's code: a block router
would have the down projection reuse gates computed at the up projection from another input, state
carried between layer calls (and recomputed out of order under activation checkpointing); a router
per layer is self-contained, adapts any linear layer, and costs ``E * in`` numbers.

The experts run as one LoRA of rank ``E * r`` whose hidden units are scaled by the token's gates
(zero outside its top-k): two products, no loop over experts or tokens. With low-rank experts this
is cheaper than gathering each expert's tokens; the result and the gradients equal the sparse sum.

Load balancing (Switch Transformer, Fedus et al. 2021; Mixtral): per layer and forward over ``T``
tokens, ``f_e`` = the share of tokens that picked expert ``e`` among their top-k (Σ f = k), ``P_e``
= the mean of ``p_e``, loss ``E Σ_e f_e P_e`` (``k`` when perfectly balanced). The trainer adds
``router_aux_loss_coef`` times the mean of the layers' losses of each training forward, and logs
each expert's share of the routed slots (``<adapter>/expert_load_<e>``, averaged over layers and
forwards) and the mean router entropy in nats (``<adapter>/router_entropy``; ``log E`` is uniform)
in ``metrics.jsonl``. Padding tokens count like the others.

Gates depend on the input, so the change is no weight: merging is refused. Rows are independent, so
mixed batches route (``dt.routing``). Files are deltatune's own (peft has no MixLoRA):
``"peft_type": "MIXLORA"``, keys ``base_model.model.<layer>.mixlora_router`` ``(E, in)``,
``<layer>.mixlora_A`` ``(E, r, in)`` and ``<layer>.mixlora_B`` ``(E, out, r)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bases import BaseLayer
from ..config import DeltaConfig, TargetedConfig
from ..values import is_positive_int
from ..errors import TargetError
from ..layer import Delta, ModelDelta
from ..registry import Method, MethodOption, Recipe, RecipeInput, register, register_recipe


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixLoraConfig(TargetedConfig):
    """MixLoRA settings (LoRA's field names for the experts). ``target_modules`` left None takes, when
    attached, the model type's feed-forward linears (``hf.FEEDFORWARD_LAYERS``: LLaMA ``gate_proj``,
    ``up_proj``, ``down_proj``; GPT-2 ``c_fc``, ``mlp.c_proj``; BERT each block's ``intermediate.dense``
    and ``output.dense``, not the attention's; T5 ``wi``/``wi_0``/``wi_1``, ``wo``)."""

    peft_type: ClassVar[str] = "MIXLORA"
    default_tables: ClassVar[Mapping[str, str]] = MappingProxyType({"target_modules": "feedforward"})

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    num_experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.01
    init_lora_weights: bool = True

    def validate(self) -> None:
        super().validate()
        for field in ("r", "num_experts", "top_k"):
            self.check(is_positive_int(getattr(self, field)), field, f"{field} must be a positive integer",
                       f"pass e.g. {field}=2")
        self.check(self.top_k <= self.num_experts, "top_k", f"top_k cannot exceed num_experts={self.num_experts}",
                   "pass top_k <= num_experts (top_k = num_experts is the dense mixture)")
        self.check(_number(self.lora_alpha), "lora_alpha", "lora_alpha must be a number", "pass e.g. lora_alpha=16")
        self.check(_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout",
                   "dropout must be in [0, 1)", "pass e.g. lora_dropout=0.05")
        self.check(_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0, "router_aux_loss_coef",
                   "the load-balancing coefficient must be a number >= 0", "pass e.g. 0.01 (0 switches it off)")
        self.check(isinstance(self.init_lora_weights, bool), "init_lora_weights", "init_lora_weights must be a bool",
                   "pass True (every B_e starts at zero) or False")


class TokenRouters(ModelDelta):
    """One MixLoRA adapter's part of the model: what its layers' routers report to the trainer.

    Layers record only in training mode. ``take_loss`` and ``take_statistics`` are the trainer's
    seam (``train.signals.TrainingSignals``); each returns what was recorded since its last call.
    """

    mergeable: ClassVar[bool] = False  # input-dependent gates: there is no weight change to fold in

    def __init__(self, num_experts: int, coefficient: float) -> None:
        super().__init__()
        self.num_experts, self.coefficient, self.name = num_experts, coefficient, "default"
        self._losses: list[Tensor] = []
        self._load, self._entropy, self._calls = torch.zeros(num_experts), torch.zeros(()), 0

    def place(self, model: nn.Module, name: str) -> None:
        self.name = name  # the log's keys name the adapter

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out recorded losses not taken yet (tensors of a graph cannot be copied)."""
        return {**super().__getstate__(), "_losses": []}

    def record(self, loss: Tensor, load: Tensor, entropy: Tensor) -> None:
        self._losses.append(loss)
        self._load = self._load.to(load.device) + load
        self._entropy = self._entropy.to(entropy.device) + entropy
        self._calls += 1

    def take_loss(self) -> Tensor | None:
        """``router_aux_loss_coef`` times the mean load-balancing loss of the layer calls since the last take."""
        losses, self._losses = self._losses, []
        return self.coefficient * torch.stack(losses).mean() if losses and self.coefficient else None

    def take_statistics(self) -> dict[str, float]:
        """Each expert's share of routed slots and the router entropy, averaged since the last take."""
        if not self._calls:
            return {}
        load, entropy = (self._load / self._calls).tolist(), float(self._entropy) / self._calls
        self._load, self._entropy, self._calls = torch.zeros_like(self._load), torch.zeros(()), 0
        return {f"{self.name}/router_entropy": entropy,
                **{f"{self.name}/expert_load_{e}": share for e, share in enumerate(load)}}


def route_tokens(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(router probabilities ``(T, E)``, dense gates ``(T, E)``: renormalised top-k, zero elsewhere, picks ``(T, k)``)."""
    probs = logits.float().softmax(dim=-1)
    top, picks = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, picks, top / top.sum(dim=-1, keepdim=True))
    return probs, gates, picks


def balance_loss(probs: Tensor, picks: Tensor) -> tuple[Tensor, Tensor]:
    """(``E Σ_e f_e P_e``, each expert's share of the routed slots) for one layer call."""
    experts = probs.shape[-1]
    chosen = F.one_hot(picks, experts).sum(dim=1).float().mean(dim=0)  # f_e, sums to k
    return experts * (chosen * probs.mean(dim=0)).sum(), chosen / picks.shape[-1]


class MixLoraDelta(Delta):
    """``y + s Σ_{e in topk(x)} g_e(x) B_e A_e x`` per token, on a linear layer."""

    def __init__(self, base: BaseLayer, config: MixLoraConfig, routers: TokenRouters) -> None:
        super().__init__()
        experts, r, device = config.num_experts, config.r, base.weight.device
        self.base, self.top_k, self.scaling = base, config.top_k, config.lora_alpha / r
        self.routers = routers  # a child of every layer delta of the adapter (no tensors): where statistics go
        self.mixlora_router = nn.Parameter(torch.empty(experts, base.in_features, device=device))
        self.mixlora_A = nn.Parameter(torch.empty(experts, r, base.in_features, device=device))
        self.mixlora_B = nn.Parameter(torch.empty(experts, base.out_features, r, device=device))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def contribution(self, x: Tensor, y: Tensor) -> Tensor:
        experts, out_features, r = self.mixlora_B.shape
        tokens = x.reshape(-1, x.shape[-1]).to(self.mixlora_A.dtype)
        probs, gates, picks = route_tokens(tokens @ self.mixlora_router.T, self.top_k)
        if self.training:
            self._record(probs, picks)
        hidden = self.dropout(tokens) @ self.mixlora_A.reshape(experts * r, -1).T  # (T, E * r): every expert's A x
        hidden = (hidden.view(-1, experts, r) * gates.to(hidden.dtype)[..., None]).reshape(-1, experts * r)
        stacked_b = self.mixlora_B.permute(0, 2, 1).reshape(experts * r, out_features)
        return (hidden @ stacked_b * self.scaling).reshape(*x.shape[:-1], out_features)

    def _record(self, probs: Tensor, picks: Tensor) -> None:
        loss, load = balance_loss(probs, picks)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
        self.routers.record(loss, load.detach(), entropy.detach())

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (y + self.contribution(x, y)).to(y.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"mixlora_router": self.mixlora_router, "mixlora_A": self.mixlora_A, "mixlora_B": self.mixlora_B}

    @torch.no_grad()
    def initialize(self, init: bool) -> None:
        """Router and every A_e as LoRA's A (Kaiming-uniform); every B_e zero (random with ``init=False``)."""
        nn.init.kaiming_uniform_(self.mixlora_router, a=math.sqrt(5))
        nn.init.zeros_(self.mixlora_B)
        for expert in range(self.mixlora_A.shape[0]):
            nn.init.kaiming_uniform_(self.mixlora_A[expert], a=math.sqrt(5))
            if not init:
                nn.init.kaiming_uniform_(self.mixlora_B[expert], a=math.sqrt(5))


def make_routers(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> TokenRouters:
    assert isinstance(config, MixLoraConfig)
    return TokenRouters(config.num_experts, float(config.router_aux_loss_coef))


def make_mixlora(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> MixLoraDelta:
    assert isinstance(config, MixLoraConfig) and isinstance(shared, TokenRouters)
    if base.kind != "linear":
        raise TargetError(f"MixLoRA cannot adapt {key!r}, a {base.describe()}: its experts adapt linear layers only. "
                          "Fix: narrow target_modules to the feed-forward projections.")
    delta = MixLoraDelta(base, config, shared)
    delta.initialize(config.init_lora_weights)
    return delta


MIXLORA = register(Method("MIXLORA", MixLoraConfig, make_mixlora, make_model_delta=make_routers))

MIXLORA_OPTIONS = (
    MethodOption("num_experts", "int", 8, "MixLoRA: LoRA experts per adapted layer"),
    MethodOption("top_k", "int", 2, "MixLoRA: experts each token uses"),
    MethodOption("router_aux_loss_coef", "float", 0.01, "MixLoRA: weight of the load-balancing loss"),
)


def build_mixlora(run: RecipeInput) -> MixLoraConfig:
    options = run.options
    return MixLoraConfig(r=options["r"], lora_alpha=options["lora_alpha"], lora_dropout=options["lora_dropout"],
                         num_experts=options["num_experts"], top_k=options["top_k"],
                         router_aux_loss_coef=options["router_aux_loss_coef"], target_modules=run.target_modules,
                         **run.common)


register_recipe(Recipe("mixlora", "MixLoRA (Li et al. 2024): top-k routed LoRA experts per layer, load-balancing "
                                  "loss; targets default to the feed-forward block's linear layers",
                       build_mixlora, options=MIXLORA_OPTIONS))
