"""AdapterFusion (Pfeiffer et al. 2020, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning"): at every site where all its member bottleneck adapters have a block, an
attention over the members' outputs, trained while the members stay frozen.

Per position, with ``u_i`` the members' scaled up-projections: scores ``query(q) . key(u_i)``,
softmax over members (divided by a temperature T when ``temperature``: 50, lowered by 0.05 per
call down to 1), the weighted sum of ``value(u_i)``, plus the adapter skip; then the last member's
post step (``bottleneck_block.FusionBlock``; AdapterHub's fields and presets: ``FusionConfig`` is
"dynamic", ``StaticFusionConfig`` "static"). Init: query and key N(0, 0.02); the value the
identity (plus 1e-6 elsewhere) with ``value_initialized``. Parameters per site: ``2 h (h + 1) + h^2``
(dynamic). Attaching a fusion freezes its members (as AdapterHub's ``train_adapter_fusion``);
``dt.set_active(model, dt.Fuse("a", "b"))`` runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import nn

from ..compose import Composition, Fuse
from ..config import DeltaConfig
from ..errors import TargetError
from ..hf import hidden_size
from ..layer import adapter_dtype
from ..registry import Method, register
from ..sites import Site, SiteBlocks, SiteConfig, check_room
from ..state import STATE_ATTR
from .bottleneck import BottleneckAdapter
from .bottleneck_block import FusionBlock


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusionConfig(SiteConfig):
    """AdapterFusion over ``adapter_names``, with AdapterHub's fields; defaults are its "dynamic" preset."""

    peft_type: ClassVar[str] = "ADAPTER_FUSION"

    adapter_names: tuple[str, ...] = ()
    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    dropout_prob: float | None = None
    """None: the model config's attention dropout (BERT's ``attention_probs_dropout_prob``), else 0."""

    def validate(self) -> None:
        super().validate()
        names = self.adapter_names
        self.check(isinstance(names, tuple) and len(names) >= 2 and len(set(names)) == len(names)
                   and all(isinstance(n, str) for n in names), "adapter_names",
                   "a fusion needs two or more distinct member adapters", "pass e.g. adapter_names=['a', 'b']")
        for flag in ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
                     "value_before_softmax", "value_initialized"):
            self.check(isinstance(getattr(self, flag), bool), flag, f"{flag} must be a bool", "pass True or False")
        drop = self.dropout_prob
        self.check(drop is None or (isinstance(drop, (int, float)) and 0 <= drop < 1), "dropout_prob",
                   "it must be in [0, 1) or None", "pass e.g. 0.1, or None for the model's attention dropout")

    def active_form(self, name: str) -> Composition:
        """A fusion runs as ``Fuse`` over its members (found by them, whatever its own name)."""
        return Fuse(*self.adapter_names)


def StaticFusionConfig(**fields: object) -> FusionConfig:  # noqa: N802 - named as the preset users know
    """AdapterHub's "static" preset: no value projection, no regularisation."""
    preset: dict[str, object] = {"value": False, "regularization": False, "value_initialized": False}
    return FusionConfig(**{**preset, **fields})  # type: ignore[arg-type]


class FusionAdapter(SiteBlocks):
    """One fusion block per site where every member has a block."""

    file_part = "fusion"

    def __init__(self, members: Sequence[str], sites: Sequence[Site], blocks: Sequence[FusionBlock]) -> None:
        super().__init__(sites, blocks)
        self.members = tuple(members)

    def block_at(self, site: str) -> FusionBlock | None:
        """This fusion's block at the site named ``site``, if it has one there."""
        key = next((k for k, s in self.sites.items() if s.name == site), None)
        block = self.blocks[key] if key is not None else None
        return block if isinstance(block, FusionBlock) else None

    def place(self, model: nn.Module, name: str) -> None:
        super().place(model, name)
        state = model.__dict__[STATE_ATTR]  # the members are frozen while their fusion trains
        for member in self.members:
            for param in state.model_deltas[member].parameters():
                param.requires_grad_(False)


def make_fusion(model: nn.Module, config: DeltaConfig, views: Mapping[str, object]) -> FusionAdapter:
    assert isinstance(config, FusionConfig)
    state = model.__dict__.get(STATE_ATTR)
    parts = state.model_deltas if state is not None else {}
    missing = [n for n in config.adapter_names if not isinstance(parts.get(n), BottleneckAdapter)]
    if missing:
        raise TargetError(f"FusionConfig.adapter_names: {missing} are not bottleneck adapters on this model; attach "
                          "or load the member adapters first (a fusion attends over bottleneck adapters' outputs)")
    twin = next((n for n, p in parts.items() if isinstance(p, FusionAdapter) and p.members == config.adapter_names), None)
    if twin is not None:
        raise TargetError(f"fusion {twin!r} already fuses {list(config.adapter_names)}; dt.Fuse finds a fusion by its "
                          f"members, so a second one could not run. Delete it first (dt.delete_adapter(model, {twin!r}))")
    members = [parts[n] for n in config.adapter_names]
    shared = [s for s in members[0].sites if all(s in m.sites for m in members)]
    if not shared:
        raise TargetError(f"adapters {list(config.adapter_names)} share no site, so there is nothing to fuse")
    sites = [members[0].sites[s] for s in shared]
    check_room(model, sites)
    dropout = config.dropout_prob
    if dropout is None:
        dropout = float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0)
    width, like = hidden_size(model), next(model.parameters())
    blocks = [FusionBlock(width, query=config.query, key=config.key, value=config.value,
                          query_before_ln=config.query_before_ln, residual_before=config.residual_before,
                          temperature=config.temperature, value_before_softmax=config.value_before_softmax,
                          value_initialized=config.value_initialized, dropout=dropout).to(like.device, adapter_dtype(like.dtype))
              for _ in sites]
    return FusionAdapter(config.adapter_names, sites, blocks)


FUSION = register(Method("ADAPTER_FUSION", FusionConfig, None, make_model_delta=make_fusion))
