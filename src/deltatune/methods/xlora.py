"""X-LoRA (Buehler & Buehler 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts"): a classifier
over the hidden states of a first pass produces per-token (and per-layer, with
``layerwise_scalings``) scalings of frozen, already trained LoRA experts, used in the real pass.

Every forward runs the model twice. The scaling pass (no gradients) runs with every expert's input
scaled by ``scaling_pass_value``; the classifier maps its last hidden state ``h: (b, t, hidden)`` to
logits, reshaped to ``(b, t, n_layers, n_experts)`` (repeated over layers without
``layerwise_scalings``) and softmaxed over experts at ``softmax_temperature`` (``enable_softmax``).
In the real pass, layer ``l`` (the adapted modules numbered in module order, as peft numbers its
LoRA layers) takes ``s = scalings[:, :, l]``, keeps its ``top_k_lora`` largest (others zero; with
``enable_softmax_topk`` a softmax over the kept ones) and adds
``Σ_e B_e A_e (x * s_e) * scaling_e * global_scaling_weight``. The experts are read from the LoRA
folders ``adapters`` names (in its order) and stay frozen unless ``use_trainable_adapters``.

The change depends on every token's hidden state: merging is refused, and so is any composition
other than this adapter alone (a mixed batch would run the scaling pass over other adapters' rows).
``generate`` must run with ``use_cache=False`` (each step recomputes the whole sequence, as in peft).

Files: peft's ``adapter_config.json`` (``"peft_type": "XLORA"``); the classifier under peft's state
keys ``base_model.internal_xlora_classifier.layers.<i>.{weight,bias}`` (peft 0.21.2 itself writes
an empty tensor file for X-LoRA, so its folders cannot carry a trained classifier); with
``use_trainable_adapters``, the experts too (``base_model.xlora_experts.<module>.{A,B}_<e>``). A save
copies the expert folders into the adapter's folder and names them relatively (``xlora_config``); a
load reads the experts again from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..compose import Composition, splits_rows
from ..config import DeltaConfig
from ..errors import AdapterError, TargetError
from ..hf import hidden_size
from ..layer import HookedDelta, ModelDelta, Removable
from ..registry import Method, register
from ..sites import site_holder
from .xlora_config import XLoraConfig
from .xlora_parts import ExpertLayer, XLoraClassifier, read_experts

CLASSIFIER_KEY = "base_model.internal_xlora_classifier."
EXPERTS_KEY = "base_model.xlora_experts."


class XLoraPart(HookedDelta):
    """The classifier and the experts of one X-LoRA adapter, hooked into the model while active."""

    mergeable: ClassVar[bool] = False

    def __init__(self, config: XLoraConfig, experts: Mapping[str, ExpertLayer], order: list[str]) -> None:
        super().__init__()
        self.config, self.order = config, order  # order: adapted module keys; the index is peft's layer number
        self.experts = nn.ModuleDict({str(i): experts[key] for i, key in enumerate(order)})
        self.classifier = XLoraClassifier(config.hidden_size, len(config.adapters), len(order), config.xlora_depth,
                                          config.xlora_size, config.xlora_dropout_p, config.layerwise_scalings)
        self.scalings: Tensor | None = None
        """The latest scalings ``(batch, tokens, n_layers, n_experts)`` (peft's ``internal_xlora_scalings``)."""
        self._gates: Tensor | None = None  # what the layers use in the pass under way
        self._in_scaling_pass = False
        self.name, self._totals, self._calls = "default", torch.zeros(len(config.adapters) + 1), 0

    def take_loss(self) -> Tensor | None:
        """The trainer's seam (``train.signals.TrainingSignals``): X-LoRA adds no loss term."""
        return None

    def take_statistics(self) -> dict[str, float]:
        """Each expert's mean scaling and the scalings' mean entropy (nats), over training forwards since the last take."""
        if not self._calls:
            return {}
        means = (self._totals / self._calls).tolist()
        self._totals, self._calls = torch.zeros_like(self._totals), 0
        return {f"{self.name}/router_entropy": means[-1],
                **{f"{self.name}/expert_load_{e}": share for e, share in enumerate(means[:-1])}}

    def _record(self, scalings: Tensor) -> None:
        flat = scalings.detach().float().reshape(-1, scalings.shape[-1])
        probs = flat.clamp_min(0) / flat.clamp_min(0).sum(dim=-1, keepdim=True).clamp_min(1e-30)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
        self._totals = self._totals.to(flat.device) + torch.cat([flat.mean(dim=0), entropy[None]])
        self._calls += 1

    def place(self, model: nn.Module, name: str) -> None:
        self.name = name  # the log's keys name the adapter
        holder = site_holder(model, "", create=True)
        assert holder is not None
        holder[name] = self.train(holder.training)

    def unplace(self, model: nn.Module, name: str) -> None:
        holder = site_holder(model, "", create=False)
        if holder is not None and name in holder:
            del holder[name]

    def tensors(self) -> dict[str, Tensor]:
        out = {CLASSIFIER_KEY + k: v for k, v in self.classifier.state_dict(keep_vars=True).items()}
        if self.config.use_trainable_adapters:
            for i, key in enumerate(self.order):
                out.update({f"{EXPERTS_KEY}{key}.{k}": v for k, v in self.experts[str(i)].named_parameters()})
        return out

    @classmethod
    def check_active(cls, model: nn.Module, active: Mapping[str, ModelDelta], composition: Composition | str) -> None:
        alone = isinstance(composition, str) or (set(composition.names()) <= set(active) and not splits_rows(composition))
        if active and not alone:
            raise AdapterError(f"{composition!r} combines the X-LoRA adapters {sorted(active)} with others or gives "
                               "them only some rows; X-LoRA runs a scaling pass over the whole batch, so it runs "
                               "alone: dt.set_active(model, name), and other adapters' rows in separate calls")

    @classmethod
    def install(cls, model: nn.Module, active: dict[str, ModelDelta], final: bool) -> list[Removable]:
        if final:
            raise AdapterError("X-LoRA's change depends on every token's hidden state: it cannot be merged into the "
                               "weights; keep the adapter loaded (or unload without merging)")
        handles: list[Removable] = []
        for part in active.values():
            assert isinstance(part, XLoraPart)
            handles.append(model.register_forward_pre_hook(part._scaling_pass, with_kwargs=True))
            handles.append(model.register_forward_hook(part._end_call, always_call=True))
            for i, key in enumerate(part.order):
                handles.append(model.get_submodule(key).register_forward_hook(partial(part._add_experts, i)))
        return handles

    def _scaling_pass(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before the real pass: run the model with the experts at ``scaling_pass_value``, then the classifier."""
        if self._in_scaling_pass:
            return
        if kwargs.get("past_key_values") is not None:
            raise AdapterError("X-LoRA recomputes the whole sequence every call: run generate with use_cache=False")
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if not isinstance(first, Tensor):
            raise AdapterError("X-LoRA needs input_ids or inputs_embeds (batch, tokens) in the model's call")
        shape = (first.shape[0], first.shape[1], len(self.order), len(self.config.adapters))
        self._gates = torch.full(shape, self.config.scaling_pass_value, device=first.device)
        self._in_scaling_pass = True
        try:
            with torch.no_grad():
                output = model(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True,
                                         "use_cache": False})
        finally:
            self._in_scaling_pass, self._gates = False, None
        hidden = output.hidden_states[-1].to(self.classifier.layers[0].weight.dtype)
        self.scalings = self.classifier(hidden, self.config.softmax_temperature, self.config.enable_softmax)
        self._gates = self.scalings
        if self.training:
            self._record(self.scalings)

    def _end_call(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._in_scaling_pass:
            self._gates = None  # a layer called on its own later must not use this call's scalings

    def _mixed(self, layer: int) -> Tensor:
        """peft's ``get_maybe_topk_scalings``: this layer's scalings, top-k kept, optionally re-softmaxed."""
        assert self._gates is not None
        gates = self._gates[:, :, layer, :]
        if self.config.top_k_lora is not None:
            picks = gates.topk(self.config.top_k_lora, dim=-1).indices
            gates = gates * torch.zeros_like(gates, dtype=torch.bool).scatter(-1, picks, True).to(gates.dtype)
        if self.config.enable_softmax_topk:
            kept = gates != 0
            gates = gates.masked_fill(~kept, float("-inf")).softmax(dim=-1).masked_fill(~kept, 0.0)
        return gates

    def _add_experts(self, layer: int, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        if self._gates is None:
            raise AdapterError("an X-LoRA layer ran outside a call of the whole model; call the model itself")
        experts = self.experts[str(layer)]
        assert isinstance(experts, ExpertLayer)
        change = experts.change(args[0], self._mixed(layer), self.config.global_scaling_weight)
        return (output + change).to(output.dtype)


def make_xlora(model: nn.Module, config: DeltaConfig, views: Mapping[str, object]) -> XLoraPart:
    assert isinstance(config, XLoraConfig)
    factors = read_experts(config.adapters, config.file_prefix)
    modules = dict(model.named_modules())
    missing = sorted(set(factors) - set(modules))
    if missing:
        raise TargetError(f"the X-LoRA experts adapt {missing[:3]}, which this model does not have; use experts "
                          "trained on this model")
    if hidden_size(model) != config.hidden_size:
        raise TargetError(f"XLoraConfig.hidden_size={config.hidden_size} but the model's hidden size is "
                          f"{hidden_size(model)}; pass hidden_size={hidden_size(model)}")
    for key, by_expert in factors.items():
        weight = getattr(modules[key], "weight", None)
        for e, (a, b, _) in by_expert.items():
            if not isinstance(weight, Tensor) or weight.dim() != 2 or tuple(weight.shape) != (b.shape[0], a.shape[1]):
                raise TargetError(f"X-LoRA expert {e} adapts {key!r} with a ({b.shape[0]} x {a.shape[1]}) change, "
                                  "which does not fit that module; use experts trained on this model (linear layers)")
    order = [key for key in modules if key in factors]
    experts = {key: ExpertLayer(factors[key], config.use_trainable_adapters) for key in order}
    device = next(model.parameters()).device
    return XLoraPart(config, experts, order).to(device)


def settle_hidden_size(model: nn.Module, config: DeltaConfig, views: Mapping[str, object]) -> DeltaConfig:
    """``hidden_size=0`` becomes the model's, so the saved config always holds the number."""
    assert isinstance(config, XLoraConfig)
    return config if config.hidden_size else config.replace(hidden_size=hidden_size(model))


XLORA = register(Method("XLORA", XLoraConfig, None, settle_hidden_size, make_model_delta=make_xlora))
