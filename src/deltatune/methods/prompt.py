"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): virtual tokens before the
input, from a trained table or a trained encoder, at the model-input site (``virtual_tokens``);
prefix tuning (Li & Liang 2021; P-tuning v2 without the projection): key/value prefixes in every
attention layer, at the attention key/value site (``kv_prefix``).

The trained module lives at ``<model>.site_adapters.<adapter>``; a file holds the virtual tokens
themselves under peft's key ``prompt_embeddings`` (for P-tuning the encoder's output, as peft
saves it; such an adapter loads frozen). Several prompt adapters can be active over different rows
(``BatchSplit``, ``Parallel``, ``Route``); a row takes one adapter's virtual tokens, so ``set_active`` refuses a
composition that gives a row two of them, or none. Merging refuses them: there is no weight to fold into.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..compose import BatchSplit, Composition, Parallel, Route, Sum, row_weights
from ..config import DeltaConfig
from ..errors import AdapterError
from ..layer import STATE_ATTR, HookedDelta, ModelDelta, Removable, adapter_dtype
from ..registry import Method, register
from ..sites import HOLDER, site_holder
from ..embedding_tokens import EmbeddingSite, embeddings_module
from ..kv_prefix import PrefixSite, cache_owner, check_positions
from ..virtual_tokens import InputSite, VirtualTokens, input_embeddings
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig, complete
from .prompt_encoders import PrefixEncoder, PromptTable, build_encoder, table_shape

FILE_KEY = "prompt_embeddings"
"""peft's file key for the virtual tokens (no module path, no adapter name)."""


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
    def check_active(cls, model: nn.Module, active: Mapping[str, ModelDelta], composition: Composition) -> None:
        shapes = {table_shape(p.config)[1:] + (p.count, _place(p.config)) for p in active.values()
                  if isinstance(p, PromptAdapter)}
        if len(shapes) > 1:
            raise AdapterError(f"set_active: adapters {list(active)} put virtual tokens of different numbers or widths, "
                               "or in different places (peft's or AdapterHub's convention), into the model; activate "
                               "one of them, or adapters of one shape and place over different rows")
        if not _one_per_row(composition, set(active)):
            raise AdapterError(f"set_active: {composition!r}: every row must take exactly one of the adapters "
                               f"{list(active)} (their virtual tokens replace each other's); use one of them, alone or "
                               "in a dt.Sum of names with other kinds of adapters, dt.BatchSplit / dt.Parallel "
                               "whose every member holds one of them, or a route giving every row one of them "
                               "(no row on the base)")

    @classmethod
    def install(cls, model: nn.Module, parts: Mapping[str, ModelDelta], final: bool) -> list[Removable]:
        prompts = {name: part for name, part in parts.items() if isinstance(part, cls)}
        if final or not prompts:
            return []
        state = model.__dict__[STATE_ATTR]
        first = next(iter(prompts.values())).config
        return [cls.site(model, lambda rows: _tokens(state.active_set.composition, prompts, rows), first)]

    @classmethod
    def site(cls, model: nn.Module, tokens: VirtualTokens, config: PromptLearningConfig) -> Removable:
        """The hook that puts every row's virtual tokens (``tokens``) into the model's calls."""
        assert config.num_virtual_tokens is not None
        place = _place(config)
        if place != "input":  # AdapterHub's convention (prompt_config.PromptTuningConfig.insert_at)
            at = 1 if place == "embeddings_after_first" else 0
            return EmbeddingSite(model, tokens, config.num_virtual_tokens, at, config.task_type)
        return InputSite(model, tokens, config.num_virtual_tokens, config.task_type)


class PrefixAdapter(PromptAdapter):
    """One prefix-tuning adapter: key/value prefixes at every attention layer (``kv_prefix``)."""

    @classmethod
    def site(cls, model: nn.Module, tokens: VirtualTokens, config: PromptLearningConfig) -> Removable:
        assert config.num_virtual_tokens and config.num_layers and config.num_attention_heads
        return PrefixSite(model, tokens, config.num_virtual_tokens, config.num_layers, config.num_attention_heads,
                          shift_positions=_place(config) == "after_prefix")


def _place(config: PromptLearningConfig) -> str:
    """Where an adapter's virtual tokens go: ``insert_at`` / ``token_positions``, peft's for P-tuning."""
    if isinstance(config, PrefixTuningConfig):
        return config.token_positions
    return config.insert_at if isinstance(config, PromptTuningConfig) else "input"


def _one_per_row(composition: Composition, names: set[str]) -> bool:
    """Whether the composition gives every row exactly one of ``names`` (see ``check_active``)."""
    def one(member: str | Composition) -> bool:
        if isinstance(member, str):
            return member in names
        return type(member) is Sum and all(isinstance(m, str) for m in member.members) and \
            sum(m in names for m in member.members) == 1
    if isinstance(composition, (BatchSplit, Parallel)):
        return all(one(m) for m in composition.members)
    if isinstance(composition, Route):
        return all(row in names for row in composition.rows)
    return one(composition)


def _tokens(composition: Composition, prompts: Mapping[str, PromptAdapter], rows: int) -> Tensor:
    """Each row's virtual tokens, (rows, n, width): the one adapter the composition gives it (checked
    when it was activated)."""
    tables = {name: part.table() for name, part in prompts.items()}
    if type(composition) is Sum:
        (table,) = tables.values()
        return table[None].expand(rows, -1, -1)
    total: Tensor | None = None
    for name, table in tables.items():
        weights = row_weights(composition, name, rows)
        if weights is not None:
            part = torch.tensor(weights, dtype=table.dtype, device=table.device)[:, None, None] * table[None]
            total = part if total is None else total + part
    assert total is not None
    return total


def make_prompt(model: nn.Module, config: DeltaConfig, views: Mapping[str, object]) -> PromptAdapter:
    assert isinstance(config, PromptLearningConfig)
    words = input_embeddings(model).weight
    assert isinstance(words, Tensor)
    if isinstance(config, PrefixTuningConfig):  # a model that cannot take them is refused before anything changes
        (cache_owner if config.token_positions == "after_prefix" else check_positions)(model)
    if isinstance(config, PromptTuningConfig) and config.insert_at != "input":
        embeddings_module(model)
    encoder = build_encoder(config, words, model).to(device=words.device, dtype=adapter_dtype(words.dtype))
    return (PrefixAdapter if isinstance(config, PrefixTuningConfig) else PromptAdapter)(config, encoder)


PROMPT_TUNING = register(Method("PROMPT_TUNING", PromptTuningConfig, None, complete, make_prompt))
P_TUNING = register(Method("P_TUNING", PromptEncoderConfig, None, complete, make_prompt))
PREFIX_TUNING = register(Method("PREFIX_TUNING", PrefixTuningConfig, None, complete, make_prompt))
