"""A causal LM forward whose loss goes through ``LinearCrossEntropy`` instead of full logits.

Installed per model instance (the class is untouched). It takes the stock path whenever the
fused one would compute something else: no labels, ``logits_to_keep`` set, or an output head
that is not a plain ``nn.Linear`` (an adapter or a saved copy on the head). With labels the
output carries the loss and ``logits=None``: the point is never to build the full logits.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from .. import hf
from .cross_entropy import IGNORE_INDEX, LinearCrossEntropy


def fused_loss_forward(model: nn.Module) -> Callable[..., Any]:
    """The replacement ``forward`` for ``model``, a transformers causal LM with a plain decoder (its
    ``base_model_prefix`` attribute: ``.model``, ``.transformer``) and ``.lm_head``."""
    stock = type(model).forward
    signature = inspect.signature(stock)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        given = dict(call.arguments)
        extra: dict[str, Any] = given.pop("kwargs", {})
        given.pop("self")
        labels, keep = given.pop("labels"), given.pop("logits_to_keep", 0)
        head = self.lm_head
        keeps_all = isinstance(keep, int) and keep == 0
        if labels is None or not keeps_all or type(head) is not nn.Linear:
            return stock(self, *args, **kwargs)
        decoder: nn.Module = getattr(self, str(self.base_model_prefix))  # .model (LLaMA), .transformer (GPT-2)
        outputs = decoder(**given, **extra)
        hidden = outputs.last_hidden_state
        loss = causal_lm_loss(hidden, head, labels, extra.get("num_items_in_batch"),
                              extra.get("ignore_index", IGNORE_INDEX), extra.get("shift_labels"))
        return hf.causal_lm_output(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                   hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    return types.MethodType(forward, model)


def causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, num_items_in_batch: Any = None,
                   ignore_index: int = IGNORE_INDEX, shift_labels: Tensor | None = None) -> Tensor:
    """transformers' causal-LM loss (tokens < n predict n; mean over labelled tokens, or the sum
    over ``num_items_in_batch``) without materializing the logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    if ignore_index != IGNORE_INDEX:
        targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
    if num_items_in_batch is None:
        divisor = float((targets != IGNORE_INDEX).sum())
    else:
        divisor = float(num_items_in_batch)
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets, divisor)
