"""Prefix tuning started from real words (Li & Liang 2021 advise it; peft lacks it): every layer's key
and value prefix set to the keys and values the frozen base model caches for a text
(``PrefixTuningConfig.prefix_init_text``).

The base runs once on the text's token ids (already repeated or cut to the prefix length), alone, at
positions ``0 .. n-1``, with every adapter switched off. Since peft's numbering puts the tokens after the
prefix (positions ``n, n+1, ...``), the model with that prefix gives on any tokens exactly what the base
gives on the text followed by them: the prefix *is* the text's cache, and training starts from the base
model conditioned on a real prompt instead of from random keys and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..adapters import disabled
from ..errors import AdapterError
from ..hf import filled_cache
from ..kv_prefix import cache_owner, cached_pairs, pairs_table
from ..state import delta_layers
from ..virtual_tokens import input_embeddings
from .prompt_config import PrefixTuningConfig


def text_prefix(model: nn.Module, config: PrefixTuningConfig, ids: list[int]) -> Tensor:
    """The prefix table ``(len(ids), layers * 2 * token_dim)``: per layer the base's cached keys and values of ``ids``."""
    owner = cache_owner(model)
    if any(layer.merged for _, layer in delta_layers(model)):
        raise AdapterError("prefix_init_text runs the base model, but adapters are merged into its weights; "
                           "unmerge them first (dt.unmerge) so the base can run unchanged")
    device = next(input_embeddings(model).parameters()).device
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    cache = filled_cache([], False)  # passed in, since encoders (BERT) fill it but return none
    with disabled(model), _evaluating(owner), torch.no_grad():
        owner(input_ids=tokens, attention_mask=torch.ones_like(tokens), past_key_values=cache, use_cache=True)
    pairs = cached_pairs(cache)
    _check_fits(config, pairs, len(ids))
    return pairs_table(pairs)


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in evaluation mode (no dropout in the cached keys) inside the block, every submodule's own
    mode given back after it."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def _check_fits(config: PrefixTuningConfig, pairs: list[tuple[Tensor, Tensor]], count: int) -> None:
    """Refuse a cache whose layers or heads differ from what the prefix table is sized for."""
    heads, width = config.num_attention_heads, config.token_dim
    want = (1, heads, count, (width or 0) // (heads or 1))
    shapes = {tuple(t.shape) for pair in pairs for t in pair}
    if len(pairs) != config.num_layers or shapes != {want}:
        raise AdapterError(f"prefix_init_text: the model cached {len(pairs)} layers of keys/values shaped {shapes}, "
                           f"but the prefix is sized for {config.num_layers} layers of {want} (num_layers, "
                           "num_attention_heads, token_dim); leave those fields unset so they are read from the model")
