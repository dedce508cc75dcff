"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): virtual tokens before the
input, from a trained table or a trained encoder, at the model-input site (``virtual_tokens``);
prefix tuning (Li & Liang 2021; P-tuning v2 without the projection): key/value prefixes in every
attention layer, at the attention key/value site (``kv_prefix``).

The trained module lives at ``<model>.site_adapters.<adapter>``; a file holds the virtual tokens
themselves under peft's key ``prompt_embeddings`` (for P-tuning the encoder's output, as peft
saves it; such an adapter loads frozen). Several prompt adapters can be active over different rows
(``BatchSplit``, ``Parallel``); a row takes one adapter's virtual tokens, so a ``Sum`` or ``Average``
of two is refused when the model is called. Merging refuses them: there is no weight to fold into.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..compose import Average, BatchSplit, Composition, Parallel, Sum, row_weights
from ..config import DeltaConfig
from ..errors import AdapterError
from ..layer import STATE_ATTR, HookedDelta, ModelDelta, Removable, adapter_dtype
from ..registry import Method, register
from ..sites import HOLDER, site_holder
from ..kv_prefix import PrefixSite, cache_owner
from ..virtual_tokens import InputSite, VirtualTokens, input_embeddings
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig, complete
from .prompt_encoders import PrefixEncoder, PromptTable, build_encoder

FILE_KEY = "prompt_embeddings"
"""peft's file key for the virtual tokens (no module path, no adapter name)."""
ROW_SPLITS = (Sum, BatchSplit, Parallel)
"""Compositions that give each row one prompt adapter."""


class PromptAdapter(HookedDelta):
    """One prompt adapter: its encoder (or table) and how many virtual tokens the input gets."""

    mergeable = False

    def __init__(self, config: PromptLearningConfig, encoder: nn.Module) -> None:
        super().__init__()
        assert config.num_virtual_tokens is not None
        self.config, self.encoder, self.count = config, encoder, config.num_virtual_tokens

    def modules_changed(self) -> int:
        return 1

    def place(self, model: nn.Module, name: str) -> None:
        holder = site_holder(model, "", create=True)
        assert holder is not None
        holder[name] = self.encoder.train(holder.training)

    def unplace(self, model: nn.Module, name: str) -> None:
        holder = site_holder(model, "", create=False)
        if holder is not None and name in holder:
            del holder[name]
        if holder is not None and not len(holder):
            delattr(model, HOLDER)

    def table(self) -> Tensor:
        """One row's virtual tokens, (rows, width)."""
        return self.encoder.table()  # type: ignore[operator]

    def tensors(self) -> dict[str, Tensor]:
        if isinstance(self.encoder, PromptTable) or (isinstance(self.encoder, PrefixEncoder)
                                                     and self.encoder.transform is None):
            return {FILE_KEY: self.encoder.embedding.weight}  # the file holds this table itself
        return {f"prompt_encoder.{k}": t for k, t in self.encoder.state_dict(keep_vars=True).items()}

    def tensors_to_save(self) -> dict[str, Tensor]:
        """The virtual tokens as evaluation computes them (no encoder dropout), whatever the mode."""
        training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                return {FILE_KEY: self.table().detach()}
        finally:
            self.encoder.train(training)

    @classmethod
    def install(cls, model: nn.Module, parts: Mapping[str, ModelDelta], final: bool) -> list[Removable]:
        prompts = {name: part for name, part in parts.items() if isinstance(part, cls)}
        if final or not prompts:
            return []
        first = next(iter(prompts.values()))
        if any(p.count != first.count or p.table().shape[-1] != first.table().shape[-1] for p in prompts.values()):
            raise AdapterError(f"prompt adapters {list(prompts)} are active together but differ in their number or "
                               "width of virtual tokens; activate one, or adapters of one shape over different rows")
        state = model.__dict__[STATE_ATTR]
        return [cls.site(model, lambda rows: _tokens(state.active_set.composition, prompts, rows), first.config)]

    @classmethod
    def site(cls, model: nn.Module, tokens: VirtualTokens, config: PromptLearningConfig) -> Removable:
        """The hook that puts every row's virtual tokens (``tokens``) into the model's calls."""
        assert config.num_virtual_tokens is not None
        return InputSite(model, tokens, config.num_virtual_tokens, config.task_type)


class PrefixAdapter(PromptAdapter):
    """One prefix-tuning adapter: key/value prefixes at every attention layer (``kv_prefix``)."""

    @classmethod
    def site(cls, model: nn.Module, tokens: VirtualTokens, config: PromptLearningConfig) -> Removable:
        assert config.num_virtual_tokens and config.num_layers and config.num_attention_heads
        return PrefixSite(model, tokens, config.num_virtual_tokens, config.num_layers, config.num_attention_heads)


def _tokens(composition: Composition, prompts: Mapping[str, PromptAdapter], rows: int) -> Tensor:
    """Each row's virtual tokens, (rows, n, width): the one prompt adapter the composition gives it."""
    if not isinstance(composition, ROW_SPLITS) or any(isinstance(m, Composition) and not isinstance(m, ROW_SPLITS)
                                                       for m in composition.members):
        raise AdapterError(f"{composition!r}: prompt adapters {list(prompts)} combine with dt.Sum (one prompt adapter, "
                           "with other methods' adapters), dt.BatchSplit and dt.Parallel (one per row) only")
    if len(prompts) == 1:
        name, part = next(iter(prompts.items()))
        return part.table()[None].expand(rows, -1, -1)
    weights = {name: row_weights(composition, name, rows) for name in prompts}
    share = [sum(w[i] for w in weights.values() if w is not None) for i in range(rows)]
    if isinstance(composition, Average) or any(s != 1 for s in share):
        raise AdapterError(f"{composition!r}: a row takes the virtual tokens of exactly one prompt adapter; "
                           "give each prompt adapter its own rows (dt.BatchSplit)")
    total = None
    for name, part in prompts.items():
        w = weights[name]
        if w is None:
            continue
        mask = torch.tensor(w, dtype=part.table().dtype, device=part.table().device)[:, None, None]
        total = mask * part.table()[None] if total is None else total + mask * part.table()[None]
    assert total is not None
    return total


def make_prompt(model: nn.Module, config: DeltaConfig, views: Mapping[str, object]) -> PromptAdapter:
    assert isinstance(config, PromptLearningConfig)
    words = input_embeddings(model).weight
    assert isinstance(words, Tensor)
    if isinstance(config, PrefixTuningConfig):
        cache_owner(model)  # a model that cannot take prefixes is refused before anything changes
    encoder = build_encoder(config, words).to(device=words.device, dtype=adapter_dtype(words.dtype))
    return (PrefixAdapter if isinstance(config, PrefixTuningConfig) else PromptAdapter)(config, encoder)


PROMPT_TUNING = register(Method("PROMPT_TUNING", PromptTuningConfig, None, complete, make_prompt))
P_TUNING = register(Method("P_TUNING", PromptEncoderConfig, None, complete, make_prompt))
PREFIX_TUNING = register(Method("PREFIX_TUNING", PrefixTuningConfig, None, complete, make_prompt))
