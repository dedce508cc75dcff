"""The attention key/value site: trained key/value prefixes in every attention layer, through
transformers' cache objects.

A forward pre-hook hands the model a cache that already holds the prefixes (``n`` positions per
layer), so every attention layer attends over ``prefix + tokens``, and lengthens the attention
mask by ``n``; position ids (given or computed) then start after the prefix, as the model counts
the cache (peft's numbering), or, when the site keeps positions, stay what they are without the prefix
(AdapterHub's: the hook passes ``0, 1, ...`` after the tokens already cached, since the model would count
the prefix). Generation works through the same hook: once the cache is filled, later calls only
get the longer mask. Models whose head class takes no cache (BERT's sequence classifier) are
hooked at their base model, which does. An encoder-decoder model gets the prefixes in its
decoder's self-attention (peft's layout for two transformer stacks). Names no method.

The prefix of one row is a table ``(n, layers * 2 * heads * head_dim)``: per virtual token, for
each layer a key then a value, each ``heads x head_dim`` (the key/value heads of grouped-query
attention).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import AdapterError
from .hf import filled_cache
from .virtual_tokens import PREFIX_LENGTH_ATTR, cache_length, call_arguments, longer_mask

Prefixes = Callable[[int], Tensor]
"""(batch size) -> every row's prefix table, (batch, n, layers * 2 * heads * head_dim)."""


def _takes_cache(module: nn.Module) -> bool:
    return "past_key_values" in inspect.signature(module.forward).parameters


def cache_owner(model: nn.Module) -> nn.Module:
    """The module whose calls take the cache: the model, or its base model when the head class takes none."""
    if _takes_cache(model):
        return model
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if isinstance(base, nn.Module) and _takes_cache(base):
        return base
    raise AdapterError(f"{type(model).__name__} takes no past_key_values (nor does its base model), so key/value "
                       "prefixes cannot reach its attention layers; use virtual tokens at the input or a weight-space "
                       "method")


def check_positions(model: nn.Module) -> nn.Module:
    """The cache owner, refused unless its calls take ``position_ids`` (keeping the tokens' positions needs them)."""
    owner = cache_owner(model)
    if "position_ids" not in inspect.signature(owner.forward).parameters:
        raise AdapterError(f"{type(owner).__name__} takes no position_ids, so its tokens cannot keep their positions "
                           "behind key/value prefixes (AdapterHub's numbering); use prefixes that number the tokens "
                           "after them (peft's, token_positions='after_prefix')")
    return owner


def layer_pairs(table: Tensor, layers: int, heads: int, stacks: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer the (key, value) prefix, each (batch, heads, n, head_dim), from a batch of tables.

    With two stacks (encoder-decoder) the layer entries are doubled and read four at a time, the
    first two being the decoder self-attention's, as peft lays them out.
    """
    batch, count, width = table.shape
    entries = table.view(batch, count, 2 * layers, heads, width // (2 * layers * heads))
    if stacks == 2:
        entries = entries.repeat(1, 1, 2, 1, 1)
    per_layer = entries.permute(2, 0, 3, 1, 4).split(2 * stacks)
    return [(group[0], group[1]) for group in per_layer]


def cached_pairs(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """Per layer the (key, value) a transformers cache holds, each (batch, heads, n, head_dim)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not all(isinstance(getattr(layer, "keys", None), Tensor) for layer in layers):
        raise AdapterError(f"the model filled no key/value cache this version can read ({type(cache).__name__}); "
                           "its attention layers cannot give key/value prefixes")
    return [(layer.keys, layer.values) for layer in layers]


def pairs_table(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """One row's prefix table (n, layers * 2 * heads * head_dim) from per-layer (key, value) pairs of one
    sequence, each (1, heads, n, head_dim): the inverse of ``layer_pairs`` for one stack."""
    entries = torch.stack([part[0] for pair in pairs for part in pair])  # (2 * layers, heads, n, head_dim)
    return entries.permute(2, 0, 1, 3).reshape(int(entries.shape[2]), -1)


class PrefixSite:
    """The hook that puts one batch of prefixes into every call of ``model``."""

    def __init__(self, model: nn.Module, prefixes: Prefixes, count: int, layers: int, heads: int,
                 shift_positions: bool = True) -> None:
        # No reference to the model here: the hooks are kept by the model's weak registry, so a strong
        # one would keep the model alive.
        self.prefixes, self.count, self.layers, self.heads = prefixes, count, layers, heads
        self.shift_positions = shift_positions
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        owner = cache_owner(model) if shift_positions else check_positions(model)
        self.handle: RemovableHandle = owner.register_forward_pre_hook(self._call, with_kwargs=True)
        self.after: RemovableHandle = owner.register_forward_hook(self._returned, with_kwargs=True)

    def _call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        call = call_arguments(module, args, kwargs)
        mask_key = "decoder_attention_mask" if self.encoder_decoder else "attention_mask"
        call[mask_key] = longer_mask(call.get(mask_key), self.count)
        if not self.shift_positions:
            call["position_ids"] = _own_positions(call)
        elif isinstance(call.get("position_ids"), Tensor):
            call["position_ids"] = call["position_ids"] + self.count
        if cache_length(call.get("past_key_values")):  # generating: the prefixes are in the cache
            return (), call
        if module.training and _checkpointing(module):
            raise AdapterError("key/value prefixes cannot train with gradient checkpointing: recomputing a layer "
                               "would add its prefix to the cache twice; call model.gradient_checkpointing_disable()")
        rows = _batch_size(call)
        table = self.prefixes(rows).to(_dtype(module))
        cache = filled_cache(layer_pairs(table, self.layers, self.heads, 2 if self.encoder_decoder else 1),
                             self.encoder_decoder)
        setattr(cache, PREFIX_LENGTH_ATTR, self.count)  # an input-site hook after this one sees no tokens cached
        call["past_key_values"] = cache
        return (), call

    def _returned(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """A call with ``use_cache=False`` returns no cache, as without the adapter: some models (LLaMA)
        return the cache they were handed whatever ``use_cache`` says, and ``generate(use_cache=False)``
        would hand the prefixed cache of one step to the next, which then skips its prefixes."""
        if kwargs.get("use_cache") is False and getattr(output, "past_key_values", None) is not None:
            output.past_key_values = None
        return output

    def remove(self) -> None:
        self.handle.remove()
        self.after.remove()


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on, under either name it has had."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):  # on the class: an instance lookup of the old name warns in transformers 5
            return bool(getattr(model, name))
    return False


def _own_positions(call: dict[str, Any]) -> Tensor:
    """The call's position ids as without the prefix: the given ones, else ``past, past + 1, ...`` for its
    tokens, ``past`` being the tokens already cached (the prefix not counted; the model would count it)."""
    given = call.get("position_ids")
    if isinstance(given, Tensor):
        return given
    tokens = next((call[k] for k in ("input_ids", "inputs_embeds") if isinstance(call.get(k), Tensor)), None)
    if tokens is None:
        raise AdapterError("key/value prefixes that keep the tokens' positions need the call's input_ids or "
                           "inputs_embeds (or its position_ids)")
    past = cache_length(call.get("past_key_values"))
    positions = torch.arange(past, past + int(tokens.shape[1]), device=tokens.device)
    return positions[None].expand(int(tokens.shape[0]), -1)


def _batch_size(call: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        value = call.get(key)
        if isinstance(value, Tensor):
            return int(value.shape[0])
    encoded = call.get("encoder_outputs")
    first = encoded[0] if encoded is not None else None
    if isinstance(first, Tensor):
        return int(first.shape[0])
    raise AdapterError("key/value prefixes need the call's input_ids or inputs_embeds to know the batch size")


def _dtype(model: nn.Module) -> Any:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype
