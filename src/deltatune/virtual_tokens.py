"""The model-input site: virtual tokens placed before a model call's tokens.

A forward pre-hook on the model rewrites the call: the token embeddings get the virtual tokens in
front (``inputs_embeds``), the attention mask gets ones for them, labels get -100 (they predict
nothing), token type ids get zeros (for the task types whose heads read them), position ids are
dropped so the model numbers the longer sequence itself. Generation works through the same hook:
once the cache holds the virtual tokens, a call only gets the longer attention mask.

An encoder-decoder model gets its virtual tokens in front of the encoder's input, through a hook
on the encoder (``generate`` calls the encoder directly); the model's own hook lengthens the mask
the decoder's cross-attention reads. Names no method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import AdapterError

VirtualTokens = Callable[[int], Tensor]
"""(batch size) -> the virtual tokens' embeddings, (batch, n, hidden)."""

IGNORED_LABEL = -100
"""What transformers' losses skip: the label of a position that predicts nothing."""
TYPED_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
"""Task types whose calls keep token type ids (extended with zeros); others drop them, as peft does
(peft also drops them for question answering, and leaves its span labels unshifted: deltatune
keeps both right)."""
LABELED_TASKS = ("CAUSAL_LM", "TOKEN_CLS")
"""Task types whose labels are per position (extended with -100 over the virtual tokens)."""
SPAN_TASKS = ("QUESTION_ANS",)
"""Task types whose labels are positions (start/end), shifted past the virtual tokens."""
LAST_TOKEN_HEAD = "score"
"""The sequence-classification head of transformers' decoder-only models: it classifies every
position and the model keeps the last real token's, which it finds in ``input_ids``; called with
``inputs_embeds`` it keeps the last position, padding for a row shorter than its batch."""


def call_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by name (positional ones bound to ``forward``'s parameters)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise AdapterError(f"{type(module).__name__}.forward takes *{name}; call the model with keyword arguments")
        else:
            out[name] = value
    return out


PREFIX_LENGTH_ATTR = "deltatune_prefix_length"
"""Set by the key/value prefix site on the cache it fills: how many of its positions are prefixes."""


def cache_length(cache: Any) -> int:
    """How many positions of the call's tokens a transformers cache already holds (0 for none):
    the key/value prefixes put in for this call (``kv_prefix``) do not count, so an input-site
    hook that runs after the key/value site's still sees a first call, not a generation step."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length()) - int(getattr(cache, PREFIX_LENGTH_ATTR, 0))
    first = cache[0][0] if isinstance(cache, (tuple, list)) and cache and cache[0] else None
    return int(first.shape[-2]) if isinstance(first, Tensor) else 0


def longer_mask(mask: Tensor | None, count: int) -> Tensor | None:
    """``mask`` with ``count`` attended positions in front (None stays None: all attended)."""
    if mask is None or mask.dim() != 2:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)


def _embeddings(model: nn.Module, call: dict[str, Any]) -> Tensor:
    embeds = call.get("inputs_embeds")
    if embeds is not None:
        return embeds
    ids = call.get("input_ids")
    if ids is None:
        raise AdapterError("virtual tokens need the call's input_ids or inputs_embeds to go before; neither was given")
    return input_embeddings(model)(ids)


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding module (transformers' ``get_input_embeddings``)."""
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, nn.Module):
        raise AdapterError(f"{type(model).__name__} does not say where its token embeddings are "
                           "(get_input_embeddings); virtual tokens need a transformers model")
    return module


def prepend(model: nn.Module, call: dict[str, Any], tokens: VirtualTokens, count: int, task_type: str | None,
            mask_done: bool = False) -> dict[str, Any]:
    """The call with ``count`` virtual tokens in front of its tokens (see the module docstring)."""
    embeds = _embeddings(model, call)
    virtual = tokens(embeds.shape[0])[:, :count].to(embeds.dtype)
    call = {**call, "inputs_embeds": torch.cat([virtual, embeds], dim=1), "input_ids": None}
    if not mask_done:
        call["attention_mask"] = longer_mask(call.get("attention_mask"), count)
    labels = call.get("labels")
    if isinstance(labels, Tensor) and task_type in LABELED_TASKS and labels.dim() >= 2:
        call["labels"] = torch.cat([labels.new_full((labels.shape[0], count), IGNORED_LABEL), labels], dim=1)
    if task_type in SPAN_TASKS:
        for key in ("start_positions", "end_positions"):
            if isinstance(call.get(key), Tensor):
                call[key] = call[key] + count
    types = call.get("token_type_ids")
    if types is not None:
        call["token_type_ids"] = (torch.cat([types.new_zeros(types.shape[0], count), types], dim=1)
                                  if task_type in TYPED_TASKS else None)
    if "position_ids" in call:
        call["position_ids"] = None
    return call


class InputSite:
    """The hooks that put one adapter's virtual tokens into every call of ``model``."""

    def __init__(self, model: nn.Module, tokens: VirtualTokens, count: int, task_type: str | None) -> None:
        self.tokens, self.count, self.task_type = tokens, count, task_type
        self.handles: list[RemovableHandle] = []
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            encoder = getattr(model, "get_encoder")()
            self.handles.append(encoder.register_forward_pre_hook(self._encoder_call, with_kwargs=True))
            self.handles.append(model.register_forward_pre_hook(self._decoder_mask, with_kwargs=True))
        else:
            self.handles.append(model.register_forward_pre_hook(self._model_call, with_kwargs=True))
            head = getattr(model, LAST_TOKEN_HEAD, None)
            if task_type == "SEQ_CLS" and isinstance(head, nn.Module):
                self.handles.append(head.register_forward_pre_hook(self._last_token_last))
        self.last_token: Tensor | None = None
        """Each row's last attended position, counted from the end, between the model call and its head."""

    def _last_token_last(self, head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The head's input with each row's last real token's hidden state in the last position, which
        the model classifies (see ``LAST_TOKEN_HEAD``)."""
        from_end, self.last_token = self.last_token, None
        hidden = args[0] if args else None
        if from_end is None or not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[0] != from_end.shape[0]:
            return None
        last = hidden.shape[1] - 1 - from_end.to(hidden.device)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return (torch.cat([hidden[:, :-1], picked[:, None]], dim=1), *args[1:])

    def _model_call(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        call = call_arguments(model, args, kwargs)
        if cache_length(call.get("past_key_values")):  # generating: the virtual tokens are in the cache
            call["attention_mask"] = longer_mask(call.get("attention_mask"), self.count)
            if "position_ids" in call:
                call["position_ids"] = None
            return (), call
        call = prepend(model, call, self.tokens, self.count, self.task_type)
        mask = call.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:  # each row's last attended position, counted from the end
            # (from the end: a key/value prefix may also lengthen the mask, but not the hidden states)
            last = (torch.arange(mask.shape[1], device=mask.device) * (mask != 0)).argmax(-1)
            self.last_token = mask.shape[1] - 1 - last
        return (), call

    def _encoder_call(self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        call = call_arguments(encoder, args, kwargs)
        rows = _embeddings(encoder, call).shape[1] if call.get("input_ids") is None else call["input_ids"].shape[1]
        mask = call.get("attention_mask")
        done = mask is not None and mask.shape[-1] == rows + self.count  # the model's hook lengthened it
        return (), prepend(encoder, call, self.tokens, self.count, None, mask_done=done)

    def _decoder_mask(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        call = call_arguments(model, args, kwargs)
        call["attention_mask"] = longer_mask(call.get("attention_mask"), self.count)
        return (), call

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
