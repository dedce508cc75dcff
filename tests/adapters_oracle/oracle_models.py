"""Tiny random models with AdapterHub's ``adapters`` 1.3, and where each of their adapter sites is.

A site table names, per architecture and relative to one transformer layer, the module whose output is
the site's ``hidden_states``, the module whose input is its residual ``input_tensor``, the layer norm
applied after the sum (None for pre-LN models), and where the site's result can be read. Forward
hooks (run before AdapterHub's own hooks) record those tensors, so a test can recompute each site's
result with deltatune's ``bottleneck_block`` and compare. This table is the executable form of the
"sites" section of docs/adapterhub.md.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import adapters
import torch
from adapters.methods.modeling import Adapter, BertFusion, ParallelAdapter
from torch import Tensor, nn

from deltatune.methods.bottleneck_block import BottleneckBlock, FusionBlock, bottleneck_size

ATOL = 1e-5
"""fp32 parity: max abs diff <= 1e-5 (torch.testing with rtol=0)."""


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="(transformers|adapters)")
    warnings.filterwarnings("ignore", message=".*past_key_value.* is deprecated", category=FutureWarning)


def build(arch: str, seed: int = 0, init_adapters: bool = True) -> nn.Module:
    """A tiny randomly initialised model of the architecture, in eval mode, with ``adapters.init`` applied
    (a plain transformers model with ``init_adapters=False``; the same weights for the same seed)."""
    import transformers as tf

    _quiet()
    torch.manual_seed(seed)
    small = dict(vocab_size=128, max_position_embeddings=64)
    if arch in ("bert", "roberta"):
        cls = {"bert": (tf.BertConfig, tf.BertModel), "roberta": (tf.RobertaConfig, tf.RobertaModel)}[arch]
        model = cls[1](cls[0](num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              **small))
    elif arch == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(n_layers=2, dim=32, n_heads=2, hidden_dim=64, **small))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64))
    elif arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
        model = cls[1](cls[0](hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, **small))
    elif arch == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                                          vocab_size=128, decoder_start_token_id=0))
    else:
        raise ValueError(arch)
    if init_adapters:
        adapters.init(model)
    return model.eval()


def inputs(arch: str, batch: int = 2, length: int = 6, seed: int = 1) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=generator)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def layers(model: nn.Module, arch: str) -> list[nn.Module]:
    """The transformer layers in AdapterHub's numbering (T5: encoder blocks, then decoder blocks)."""
    if arch == "t5":
        return [*model.encoder.block, *model.decoder.block]
    return [layer for _, layer in model.base_model.iter_layers()]


@dataclass(frozen=True)
class SiteSpec:
    """Paths relative to a layer; ``kind`` of a tensor source: "out" (output, first item of a tuple),
    "in0"/"in1" (positional input, or the first keyword input for in0)."""

    location: str  # AdapterHub's location key: mh_adapter, output_adapter, cross_adapter
    adapter_layer: str  # the module holding `.adapters` (AdapterHub's BottleneckLayer)
    hidden: tuple[str, str]
    residual: tuple[str, str]
    layer_norm: str | None
    result: tuple[str, str]


def _bert_like() -> list[SiteSpec]:
    return [SiteSpec("mh_adapter", "attention.output", ("attention.output.dropout", "out"),
                     ("attention.output", "in1"), "attention.output.LayerNorm", ("attention.output", "out")),
            SiteSpec("output_adapter", "output", ("output.dropout", "out"), ("output", "in1"), "output.LayerNorm",
                     ("output", "out"))]


def _llama_like(hooked: bool) -> list[SiteSpec]:
    attn, mlp = ("self_attn.o_proj", "mlp.down_proj") if hooked else ("self_attn", "mlp")
    return [SiteSpec("mh_adapter", "attention_adapters", (attn, "out"), ("input_layernorm", "in0"), None,
                     ("post_attention_layernorm", "in0")),
            SiteSpec("output_adapter", "output_adapters", (mlp, "out"), ("post_attention_layernorm", "in0"), None,
                     ("", "out"))]


SITES: dict[str, list[SiteSpec]] = {
    "bert": _bert_like(),
    "roberta": _bert_like(),
    "distilbert": [
        SiteSpec("mh_adapter", "attention_adapters", ("attention", "out"), ("", "in0"), "sa_layer_norm",
                 ("ffn", "in0")),
        SiteSpec("output_adapter", "output_adapters", ("ffn", "out"), ("ffn", "in0"), "output_layer_norm",
                 ("", "out"))],
    "gpt2": [
        SiteSpec("mh_adapter", "attention_adapters", ("attn", "out"), ("", "in0"), None, ("ln_2", "in0")),
        SiteSpec("output_adapter", "output_adapters", ("mlp", "out"), ("ln_2", "in0"), None, ("", "out"))],
    "llama": _llama_like(hooked=False),
    "mistral": _llama_like(hooked=False),
    "qwen2": _llama_like(hooked=True),  # AdapterHub's plugin interface: hooks on o_proj / down_proj
    "t5": [  # layer.0 self-attention, layer.1 cross-attention (decoder), layer.-1 feed-forward
        SiteSpec("mh_adapter", "layer.0", ("layer.0.dropout", "out"), ("layer.0", "in0"), None, ("layer.0", "out")),
        SiteSpec("cross_adapter", "layer.1", ("layer.1.dropout", "out"), ("layer.1", "in0"), None, ("layer.1", "out")),
        SiteSpec("output_adapter", "layer.-1", ("layer.-1.dropout", "out"), ("layer.-1", "in0"), None,
                 ("layer.-1", "out"))],
}


def module_at(layer: nn.Module, path: str) -> nn.Module:
    module = layer
    for part in [p for p in path.split(".") if p]:
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)  # type: ignore[index]
    return module


@dataclass
class SiteRecord:
    layer_idx: int
    spec: SiteSpec
    adapter_layer: nn.Module
    layer_norm: nn.Module | None
    tensors: dict[str, Tensor]


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


@dataclass
class Probe:
    records: list[SiteRecord]
    handles: list[Any]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def probe_sites(model: nn.Module, arch: str) -> Probe:
    """Hooks recording every site's hidden_states, input_tensor and result on the next forward."""
    records, handles = [], []
    for idx, layer in enumerate(layers(model, arch)):
        for spec in SITES[arch]:
            if spec.location == "cross_adapter" and len(layer.layer) < 3:
                continue
            record = SiteRecord(idx, spec, module_at(layer, spec.adapter_layer),
                                module_at(layer, spec.layer_norm) if spec.layer_norm else None, {})
            records.append(record)
            for name, (path, kind) in (("hidden", spec.hidden), ("residual", spec.residual), ("result", spec.result)):
                handles.append(_hook(module_at(layer, path), kind, record.tensors, name))
    return Probe(records, handles)


def _hook(module: nn.Module, kind: str, store: dict[str, Tensor], name: str) -> Any:
    if kind == "out":
        def on_output(_m: nn.Module, _args: Any, output: Any) -> None:
            store[name] = _first(output).detach().clone()
        return module.register_forward_hook(on_output, prepend=True)

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = int(kind[2:])
        store[name] = (args[index] if len(args) > index else next(iter(kwargs.values()))).detach().clone()
    return module.register_forward_pre_hook(on_input, prepend=True, with_kwargs=True)


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Seeded noise on every adapter and fusion parameter, so none sits at its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".adapters." in name or "adapter_fusion_layer" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def block_from(adapter: Adapter, config: Any, layer_idx: int, hidden_size: int) -> BottleneckBlock:
    """A BottleneckBlock built from the AdapterHub config, holding a copy of ``adapter``'s weights
    (through ``adapterhub_keys``, so the copy also checks the key mapping)."""
    block = BottleneckBlock(
        hidden_size, bottleneck_size(hidden_size, config["reduction_factor"], layer_idx),
        non_linearity=config["non_linearity"], ln_before=config["ln_before"], ln_after=config["ln_after"],
        scaling=config["scaling"], use_gating=config["use_gating"], dropout=config["dropout"],
        init_weights=config["init_weights"], is_parallel=config["is_parallel"],
        residual_before_ln=config["residual_before_ln"], original_ln_before=config["original_ln_before"],
        original_ln_after=config["original_ln_after"], adapter_residual_before_ln=config["adapter_residual_before_ln"])
    assert isinstance(adapter, ParallelAdapter) == config["is_parallel"]
    theirs = adapter.state_dict()
    block.load_state_dict({ours: theirs[names[0]] for ours, names in block.adapterhub_keys().items()})
    return block.eval()


def fusion_from(fusion: BertFusion, config: Any, hidden_size: int) -> FusionBlock:
    ours = FusionBlock(hidden_size, query=config["query"], key=config["key"], value=config["value"],
                       query_before_ln=config["query_before_ln"], residual_before=config["residual_before"],
                       temperature=config["temperature"], value_before_softmax=config["value_before_softmax"],
                       value_initialized=bool(config["value_initialized"]))
    ours.load_state_dict(fusion.state_dict())  # the same key names: the mapping is the identity
    ours.T = fusion.T
    return ours.eval()


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def adapter_sites(probe: Probe, name: str) -> Iterator[tuple[SiteRecord, Adapter | None]]:
    for record in probe.records:
        yield record, record.adapter_layer.adapters[name] if name in record.adapter_layer.adapters else None

