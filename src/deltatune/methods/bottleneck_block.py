"""Bottleneck adapters and AdapterFusion, computed exactly as AdapterHub's ``adapters`` 1.3 does.

- Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": serial adapters after the
  attention block and after the feed-forward block (AdapterHub's DoubleSeqBnConfig).
- Pfeiffer et al. 2020 (EACL 2021), "AdapterFusion: Non-Destructive Task Composition for Transfer Learning":
  one serial adapter after the feed-forward block (SeqBnConfig), and ``FusionBlock``, an attention
  over several adapters' outputs.
- He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning": the scaled
  parallel adapter beside a sub-block (ParBnConfig).

A site is a sub-block's output ``hidden_states``, the residual ``input_tensor`` the model adds back, and
the layer norm applied after that sum (post-LN: BERT, RoBERTa, DistilBERT) or None (pre-LN: GPT-2,
LLaMA, T5). ``site_input``/``site_output`` are AdapterHub's pre/post steps around a block;
``apply_at_site``/``fuse_at_site`` chain them. Pure torch; sites, formats and composition: docs/adapterhub.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

SiteNorm = Callable[[Tensor], Tensor]
"""The layer norm a site applies after its residual sum (any callable: LayerNorm, RMSNorm, ...)."""
_SQRT_2_PI = math.sqrt(2.0 / math.pi)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "relu6": F.relu6, "relu2": lambda x: torch.square(F.relu(x)), "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(_SQRT_2_PI * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu, "swish": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "mish": F.mish,
    "leakyrelu": F.leaky_relu, "leaky_relu": F.leaky_relu, "linear": lambda x: x,
}
"""``non_linearity`` names (lower-cased, as AdapterHub does) -> the function transformers maps them to."""

INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")


def bottleneck_size(hidden_size: int, reduction_factor: float | Mapping[str, float], layer_idx: int) -> int:
    """AdapterHub's bottleneck width: ``int(hidden // factor)``, at least 1. A mapping is keyed by the layer
    index as a string, with ``"default"`` for the other layers (T5 numbers decoder layers after the encoder's)."""
    if isinstance(reduction_factor, Mapping):
        key = str(layer_idx) if str(layer_idx) in reduction_factor else "default"
        if key not in reduction_factor:
            raise ConfigError("BnConfig", "reduction_factor", dict(reduction_factor), f"no entry for layer {layer_idx}",
                              'add a "default" entry, e.g. {"1": 8, "default": 16}')
        reduction_factor = reduction_factor[key]
    return max(1, int(hidden_size // reduction_factor))


def _bert_init(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class BottleneckBlock(nn.Module):
    """One bottleneck adapter: [layer norm] -> down -> non-linearity -> up, times ``scaling``, dropout,
    [gate], then the adapter residual and [layer norm] (serial) or only [layer norm] (parallel).

    The placement fields (``is_parallel``, ``residual_before_ln``, ``original_ln_before/after``,
    ``adapter_residual_before_ln``) are kept here for ``site_input`` / ``site_output``. ``scaling`` is a
    number, ``"learned"`` (one trained scalar, starts at 1) or ``"channel"`` (one per channel).
    ``init_weights``: ``"bert"`` N(0, 0.02) for both projections; ``"mam_adapter"`` down as torch's
    Linear default, up zero (starts as the identity); ``"houlsby"`` both N(0, 0.01) truncated at
    +-0.02. Biases start at zero.
    """

    def __init__(self, hidden_size: int, bottleneck_size: int, *, non_linearity: str = "relu", ln_before: bool = False,
                 ln_after: bool = False, scaling: float | str = 1.0, use_gating: bool = False, dropout: float = 0.0,
                 init_weights: str = "bert", is_parallel: bool = False, residual_before_ln: bool | str = True,
                 original_ln_before: bool = False, original_ln_after: bool = True,
                 adapter_residual_before_ln: bool = False) -> None:
        super().__init__()
        for field, value, allowed in (("non_linearity", non_linearity.lower(), sorted(ACTIVATIONS)),
                                      ("init_weights", init_weights, INIT_WEIGHTS),
                                      ("residual_before_ln", residual_before_ln, [True, False, "post_add"])):
            if value not in allowed:
                raise ConfigError("BnConfig", field, value, "not a supported value", f"use one of {list(allowed)}")
        self.non_linearity = non_linearity.lower()
        self.activation = ACTIVATIONS[self.non_linearity]
        self.is_parallel, self.residual_before_ln = is_parallel, residual_before_ln
        self.original_ln_before, self.original_ln_after = original_ln_before, original_ln_after
        self.adapter_residual_before_ln = adapter_residual_before_ln
        self.norm_before = nn.LayerNorm(hidden_size) if ln_before else None
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.scaling: float | nn.Parameter
        if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            self.scaling = float(scaling)
        elif scaling in ("learned", "channel"):
            self.scaling = nn.Parameter(torch.ones(1 if scaling == "learned" else hidden_size))
        else:
            raise ConfigError("BnConfig", "scaling", scaling, "unknown scaling", 'use a number, "learned" or "channel"')
        self.norm_after = nn.LayerNorm(hidden_size) if ln_after else None
        self.gate = nn.Linear(hidden_size, 1) if use_gating else None
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            if init_weights == "bert":
                for linear in (self.down, self.up):
                    _bert_init(linear)
            elif init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                for tensor in (self.down.bias, self.up.weight, self.up.bias):
                    nn.init.zeros_(tensor)
            else:
                for linear in (self.down, self.up):
                    nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(linear.bias)
            if self.gate is not None and init_weights != "houlsby":
                _bert_init(self.gate)

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Adapter input ``x`` and adapter residual -> (output in ``x``'s dtype, scaled up-projection in the
        block's). Fusion attends over the second value: after ``scaling``, before dropout, gate, residual and
        ``norm_after``. Over a half-precision base the block is fp32 (``adapter_dtype``): it computes in fp32."""
        dtype, own = x.dtype, self.up.weight.dtype
        x, residual = x.to(own), residual.to(own)
        h = x if self.norm_before is None else self.norm_before(x)
        up = self.up(self.activation(self.down(h)))
        if not isinstance(self.scaling, float) or self.scaling != 1.0:  # times 1.0 is the same bits: skip that pass
            up = up * self.scaling
        out = self.dropout(up)
        if self.gate is not None:  # one gate per sequence: the sigmoid averaged over positions
            out = out * torch.mean(torch.sigmoid(self.gate(x)), dim=1).unsqueeze(-1)
        if self.is_parallel:
            return (out if self.norm_after is None else self.norm_after(out)).to(dtype), up
        out = out + residual if self.adapter_residual_before_ln else out
        out = out if self.norm_after is None else self.norm_after(out)
        return (out if self.adapter_residual_before_ln else out + residual).to(dtype), up

    def adapterhub_keys(self) -> dict[str, list[str]]:
        """Each state-dict key here -> its key(s) in an AdapterHub file, relative to ``...adapters.<name>.``.
        With ``ln_before`` AdapterHub stores the input layer norm twice (it is also ``adapter_down.0``)."""
        down = "adapter_down.1." if self.norm_before is not None else "adapter_down.0."
        prefixes = {"norm_before.": ["adapter_norm_before.", "adapter_down.0."], "down.": [down],
                    "up.": ["adapter_up."], "norm_after.": ["adapter_norm_after."], "gate.": ["gate."]}
        keys: dict[str, list[str]] = {}
        for key in self.state_dict():
            prefix = key.split(".")[0] + "." if "." in key else ""
            keys[key] = [p + key[len(prefix):] for p in prefixes[prefix]] if prefix else [key]
        return keys


def site_input(block: BottleneckBlock, hidden_states: Tensor, input_tensor: Tensor, layer_norm: SiteNorm | None,
               query_before_ln: bool = False, normed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """AdapterHub's ``pre_forward``: (adapter input, fusion query, adapter residual) at a site.

    Parallel: all three are ``input_tensor`` (the sub-block's input). Serial: the residual is
    ``hidden_states`` when ``residual_before_ln`` is True; with ``original_ln_before`` the input becomes
    ``layer_norm(hidden_states + input_tensor)`` (just the sum when the site has no layer norm); with
    ``"post_add"`` the residual is that sum before the norm; with False it is the adapter input. ``normed``:
    that normed sum where the model has it already (a post-LN site's output): not computed nor saved twice."""
    if block.is_parallel:
        return input_tensor, input_tensor, input_tensor
    rbl = block.residual_before_ln
    if rbl == "post_add" and not (block.original_ln_before and layer_norm is not None):
        raise ConfigError("BnConfig", "residual_before_ln", rbl, "needs original_ln_before and a site layer norm",
                          "use True or False at this site")
    residual = query = hidden_states
    if block.original_ln_before:
        total = hidden_states + input_tensor if layer_norm is None or normed is None or rbl == "post_add" else normed
        residual = total if rbl == "post_add" else residual
        hidden_states = total if layer_norm is None else (layer_norm(total) if normed is None else normed)
    if not rbl:
        residual = hidden_states
    return hidden_states, (query if query_before_ln else hidden_states), residual


def site_output(block: BottleneckBlock, output: Tensor, hidden_states: Tensor, input_tensor: Tensor,
                layer_norm: SiteNorm | None) -> Tensor:
    """AdapterHub's ``post_forward``: parallel adds the sub-block output ``hidden_states`` first; then,
    with ``original_ln_after``, the model's own residual and layer norm: ``layer_norm(out + input_tensor)``."""
    if block.is_parallel:
        output = output + hidden_states
    if block.original_ln_after:
        output = output + input_tensor
        if layer_norm is not None:
            output = layer_norm(output)
    return output


def apply_at_site(block: BottleneckBlock, hidden_states: Tensor, input_tensor: Tensor, layer_norm: SiteNorm | None) -> Tensor:
    """The site's new output with one adapter active (serial or parallel)."""
    x, _, residual = site_input(block, hidden_states, input_tensor, layer_norm)
    return site_output(block, block(x, residual)[0], hidden_states, input_tensor, layer_norm)


class FusionBlock(nn.Module):
    """AdapterFusion (Pfeiffer et al. 2020): per position, attention of a query over the members'
    scaled up-projections. Query and key are bert-initialised ``Linear(h, h)``; the value is a bias-free
    ``Linear(h, h)``, with ``value_initialized`` the identity plus 1e-6 off the diagonal. With
    ``temperature`` the softmax divides by T = 50, lowered by 0.05 on every forward call down to 1
    (a plain attribute, not saved, as in AdapterHub); else T = 1."""

    def __init__(self, hidden_size: int, *, query: bool = True, key: bool = True, value: bool = True,
                 query_before_ln: bool = False, residual_before: bool = False, temperature: bool = False,
                 value_before_softmax: bool = True, value_initialized: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.query_before_ln, self.residual_before = query_before_ln, residual_before
        self.value_before_softmax = value_before_softmax
        self.dense = None if (query or key or value) else nn.Linear(hidden_size, 1)  # AdapterHub keeps it, unused
        self.query = nn.Linear(hidden_size, hidden_size) if query else None
        self.key = nn.Linear(hidden_size, hidden_size) if key else None
        self.value = nn.Linear(hidden_size, hidden_size, bias=False) if value else None
        with torch.no_grad():
            for linear in (self.query, self.key, self.value):
                if linear is not None:
                    _bert_init(linear)
            if self.value is not None and value_initialized:
                self.value.weight.copy_(torch.full((hidden_size, hidden_size), 1e-6).fill_diagonal_(1.0))
        self.T = 50.0 if temperature else 1.0
        self.reduction = self.T / 1000.0
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, ups: Tensor, residual: Tensor) -> Tensor:
        """``query`` and ``residual`` (batch, seq, h); ``ups`` (batch, seq, members, h) -> (batch, seq, h) in
        ``query``'s dtype, computed in the block's (fp32 over a half-precision base, as ``BottleneckBlock``)."""
        dtype, own = query.dtype, next(self.parameters()).dtype
        query, ups, residual = query.to(own), ups.to(own), residual.to(own)
        if self.residual_before:  # AdapterHub adds in place to the one tensor that is both key and value input
            ups = ups + residual[:, :, None, :]
        q = query if self.query is None else self.query(query)
        k = ups if self.key is None else self.key(ups)
        v = self.value(ups) if self.value is not None and self.value_before_softmax else ups
        scores = self.dropout(torch.squeeze(torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)), dim=2))
        probs = torch.softmax(scores / self.T, dim=-1)
        self.T = max(self.T - self.reduction, 1.0)
        context = torch.squeeze(torch.matmul(probs.unsqueeze(2), v), dim=2)
        if self.value is not None and not self.value_before_softmax:
            context = self.value(context)
        return (context if self.residual_before else context + residual).to(dtype)


def fuse_at_site(blocks: Sequence[BottleneckBlock], fusion: FusionBlock, hidden_states: Tensor, input_tensor: Tensor,
                 layer_norm: SiteNorm | None) -> Tensor:
    """The site's new output under ``Fuse(*blocks)``: the last member's pre/post steps around the fusion;
    every member reads the same adapter input and residual."""
    x, query, residual = site_input(blocks[-1], hidden_states, input_tensor, layer_norm, fusion.query_before_ln)
    ups = torch.stack([block(x, residual)[1] for block in blocks], dim=2)
    return site_output(blocks[-1], fusion(query, ups, residual), hidden_states, input_tensor, layer_norm)
