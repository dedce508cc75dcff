"""The embeddings-output site: virtual tokens inserted into what the model's embeddings module returns.

Unlike the model-input site (``virtual_tokens``), the virtual tokens skip the embeddings module: they get
no position or token-type embedding and no input norm, and the tokens keep the positions they have
without them. They go in front (``at=0``) or after the first token (``at=1``). A forward hook on the
embeddings module (``<base model>.embeddings``, as BERT-like encoders have it) inserts them; a pre-hook on
the model lengthens the attention mask by ones *in front*, whatever ``at`` is (AdapterHub's rule: with
``at=1`` the first token takes the first mask entry, the virtual tokens the others, so a first token that
is padding is attended), and gives per-position labels -100 and answer spans their shift. A call that
continues a cache only gets the longer mask. Names no method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import AdapterError
from .virtual_tokens import IGNORED_LABEL, LABELED_TASKS, SPAN_TASKS, VirtualTokens, cache_length, call_arguments

EMBEDDINGS = "embeddings"
"""The attribute of a transformers base model holding its embeddings module (BERT, RoBERTa, ELECTRA, ...)."""


def embeddings_module(model: nn.Module) -> nn.Module:
    """The model's embeddings module, whose output the virtual tokens join; a clear error if it has none."""
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    for owner in (base, model):
        module = getattr(owner, EMBEDDINGS, None) if isinstance(owner, nn.Module) else None
        if isinstance(module, nn.Module):
            return module
    raise AdapterError(f"{type(model).__name__} has no embeddings module ('{EMBEDDINGS}' on its base model), so "
                       "virtual tokens cannot be inserted into its output (AdapterHub's convention, supported for "
                       "BERT-like encoders); put them at the input instead (peft's convention)")


def _rows_and_length(call: dict[str, Any]) -> tuple[int, int, torch.device]:
    tokens = next((call[k] for k in ("input_ids", "inputs_embeds") if isinstance(call.get(k), Tensor)), None)
    if tokens is None:
        raise AdapterError("virtual tokens need the call's input_ids or inputs_embeds; neither was given")
    return int(tokens.shape[0]), int(tokens.shape[1]), tokens.device


class EmbeddingSite:
    """The hooks that put one batch of virtual tokens into the embeddings output of every call of ``model``."""

    def __init__(self, model: nn.Module, tokens: VirtualTokens, count: int, at: int, task_type: str | None) -> None:
        self.tokens, self.count, self.at, self.task_type = tokens, count, at, task_type
        self.inserting = True
        """Set by each model call: False while it continues a cache (the virtual tokens are in it)."""
        self.handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._model_call, with_kwargs=True),
            embeddings_module(model).register_forward_hook(self._embedded),
        ]

    def _model_call(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        call = call_arguments(model, args, kwargs)
        rows, length, device = _rows_and_length(call)
        past = cache_length(call.get("past_key_values"))
        self.inserting = past == 0
        mask = call.get("attention_mask")
        if mask is None:  # explicit: the model would size its own from the tokens, without the virtual ones
            mask = torch.ones(rows, length + max(past - self.count, 0), dtype=torch.long, device=device)
        if mask.dim() == 2:
            call["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.count), mask], dim=1)
        if self.inserting:
            self._shift_labels(call)
        return (), call

    def _shift_labels(self, call: dict[str, Any]) -> None:
        """Per-position labels get -100 at the virtual tokens; answer spans at or after ``at`` move by ``count``."""
        labels = call.get("labels")
        if isinstance(labels, Tensor) and self.task_type in LABELED_TASKS and labels.dim() >= 2:
            filler = labels.new_full((labels.shape[0], self.count), IGNORED_LABEL)
            call["labels"] = torch.cat([labels[:, :self.at], filler, labels[:, self.at:]], dim=1)
        if self.task_type in SPAN_TASKS:
            for key in ("start_positions", "end_positions"):
                if isinstance(call.get(key), Tensor):
                    call[key] = call[key] + self.count * (call[key] >= self.at)

    def _embedded(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self.inserting or not isinstance(output, Tensor) or output.dim() != 3:
            return output
        virtual = self.tokens(output.shape[0])[:, :self.count].to(output.dtype)
        return torch.cat([output[:, :self.at], virtual, output[:, self.at:]], dim=1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
