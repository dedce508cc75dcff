"""Bottleneck adapters at the sites of a transformer layer (``sites``), with AdapterHub's fields.

Houlsby et al. 2019 (after attention and after the feed-forward block: ``DoubleSeqBnConfig``),
Pfeiffer et al. 2020 (after the feed-forward block: ``SeqBnConfig``), He et al. 2022 (parallel,
beside the feed-forward block: ``ParBnConfig``). Per site: ``u = up(act(down(a))) * scaling`` with
``down: hidden -> hidden // reduction_factor``, the adapter's skip and the model's residual and
layer norm placed as AdapterHub places them (``bottleneck_block``; docs/adapterhub.md). Init per
``init_weights``: "bert" N(0, 0.02), "mam_adapter" up = 0 (the identity at start), "houlsby".
Parameter count per site: ``2 * hidden * b + hidden + b`` (plus layer norms, scaling, gate).

An activation adapter changes activations, not weights: merge and ``unload(merge=True)`` refuse
it. At one site, ``dt.Stack`` chains adapters, ``dt.Average`` and ``dt.BatchSplit`` combine them
as AdapterHub does; a plain sum of two bottleneck adapters at one site is not defined.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from ..config import DeltaConfig
from ..errors import TargetError
from ..hf import hidden_size
from ..layer import STATE_ATTR, HookedDelta, ModelDelta, Removable, adapter_dtype
from ..registry import Method, MethodOption, Recipe, RecipeInput, register, register_recipe
from ..sites import Site, SiteBlocks, SiteConfig, SiteHooks, check_room, model_sites
from .bottleneck_compose import SiteFusion, run_site
from .bottleneck_block import ACTIVATIONS, INIT_WEIGHTS, BottleneckBlock, FusionBlock, bottleneck_size

LOCATIONS = ("mh_adapter", "cross_adapter", "output_adapter")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BnConfig(SiteConfig):
    """A bottleneck adapter, with AdapterHub's field names; defaults are ``SeqBnConfig``'s (Pfeiffer)."""

    peft_type: ClassVar[str] = "BOTTLENECK"

    mh_adapter: bool = False
    output_adapter: bool = True
    cross_adapter: bool = False
    reduction_factor: float | Mapping[str, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    dropout: float = 0.0
    leave_out: tuple[int, ...] = ()

    def validate(self) -> None:
        super().validate()
        self.check(self.mh_adapter or self.output_adapter or self.cross_adapter, "output_adapter",
                   "no site is selected", "set output_adapter=True and/or mh_adapter=True")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, Mapping) else [self.reduction_factor]
        self.check(all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors),
                   "reduction_factor", "it must be a positive number, or a mapping of layer numbers to them",
                   'pass e.g. 16, or {"0": 8, "default": 16}')
        self.check(self.non_linearity.lower() in ACTIVATIONS, "non_linearity", "not a supported activation",
                   f"use one of {sorted(ACTIVATIONS)}")
        self.check(self.init_weights in INIT_WEIGHTS, "init_weights", "unknown init", f"use one of {INIT_WEIGHTS}")
        self.check(self.residual_before_ln in (True, False, "post_add"), "residual_before_ln", "unknown value",
                   'use True, False or "post_add"')
        scaling = self.scaling
        number = isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling)
        self.check(scaling in ("learned", "channel") or number,
                   "scaling", "it must be a finite number, 'learned' or 'channel'", "pass e.g. 1.0 or 'learned'")
        self.check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "dropout must be in [0, 1)",
                   "pass e.g. 0.1")
        self.check(all(isinstance(i, int) and i >= 0 for i in self.leave_out), "leave_out",
                   "it must list layer numbers", "pass e.g. [0, 1]")


def SeqBnConfig(**fields: object) -> BnConfig:  # noqa: N802 - named as the preset users know
    """Pfeiffer et al. 2020: after the feed-forward block, ReLU, reduction factor 16."""
    return BnConfig(**fields)  # type: ignore[arg-type]


def DoubleSeqBnConfig(**fields: object) -> BnConfig:  # noqa: N802
    """Houlsby et al. 2019: after attention and after the feed-forward block, swish, factor 16."""
    preset: dict[str, object] = {"mh_adapter": True, "original_ln_before": False, "non_linearity": "swish"}
    return BnConfig(**{**preset, **fields})  # type: ignore[arg-type]


def ParBnConfig(**fields: object) -> BnConfig:  # noqa: N802
    """He et al. 2022: parallel to the feed-forward block, ReLU, factor 2, scaling 4, zero up-projection."""
    preset: dict[str, object] = {"original_ln_before": False, "is_parallel": True, "reduction_factor": 2,
                                 "init_weights": "mam_adapter", "scaling": 4.0}
    return BnConfig(**{**preset, **fields})  # type: ignore[arg-type]


def _block(config: BnConfig, width: int, layer: int) -> BottleneckBlock:
    return BottleneckBlock(
        width, bottleneck_size(width, config.reduction_factor, layer), non_linearity=config.non_linearity,
        ln_before=config.ln_before, ln_after=config.ln_after, scaling=config.scaling, use_gating=config.use_gating,
        dropout=config.dropout, init_weights=config.init_weights, is_parallel=config.is_parallel,
        residual_before_ln=config.residual_before_ln, original_ln_before=config.original_ln_before,
        original_ln_after=config.original_ln_after, adapter_residual_before_ln=config.adapter_residual_before_ln)


class BottleneckAdapter(SiteBlocks, HookedDelta):
    """One adapter's blocks, one per selected site; hooks at the sites run the active composition."""

    file_part = "bottleneck"

    @classmethod
    def install(cls, model: nn.Module, active: dict[str, ModelDelta], final: bool) -> list[Removable]:
        state = model.__dict__[STATE_ATTR]
        fusions = [p for p in state.model_deltas.values() if isinstance(p, SiteFusion)]
        at_site: dict[str, tuple[Site, dict[str, BottleneckBlock]]] = {}
        for name, part in active.items():
            assert isinstance(part, BottleneckAdapter)
            for key, site in part.sites.items():
                block = part.blocks[key]
                assert isinstance(block, BottleneckBlock)
                at_site.setdefault(site.name, (site, {}))[1][name] = block
        return [SiteHooks(site, partial(run_site, state.active_set, blocks, _fusions_at(fusions, site.name)))
                for site, blocks in at_site.values()]


def _fusions_at(fusions: Sequence[SiteFusion], site: str) -> dict[tuple[str, ...], FusionBlock]:
    found = {f.members: f.block_at(site) for f in fusions}
    return {members: block for members, block in found.items() if block is not None}


def make_bottleneck(model: nn.Module, config: DeltaConfig, views: Mapping[str, object]) -> BottleneckAdapter:
    assert isinstance(config, BnConfig)
    wanted = {loc for loc in LOCATIONS if getattr(config, loc)}
    sites = [s for s in model_sites(model) if s.location in wanted and s.layer not in config.leave_out]
    if not sites:
        raise TargetError(f"BnConfig selects no site of this {type(model).__name__}: locations {sorted(wanted)}, "
                          f"leave_out={list(config.leave_out)}. Fix: select output_adapter or mh_adapter, or leave out fewer layers.")
    check_room(model, sites)
    width = hidden_size(model)
    like = next(model.parameters())  # fp32 blocks over a half-precision base: AdamW's small updates are not lost
    blocks = [_block(config, width, site.layer).to(device=like.device, dtype=adapter_dtype(like.dtype)) for site in sites]
    return BottleneckAdapter(sites, blocks)


BOTTLENECK = register(Method("BOTTLENECK", BnConfig, None, make_model_delta=make_bottleneck))


def _scaling(text: str) -> float | str:
    """``--adapter-scaling``: a number, or a word BnConfig knows ('learned', 'channel'; it refuses others)."""
    try:
        return float(text)
    except ValueError:
        return text


def _recipe(preset: Callable[..., BnConfig]) -> Callable[[RecipeInput], DeltaConfig]:
    def build(run: RecipeInput) -> BnConfig:
        chosen: dict[str, object] = {}  # what the run sets; the rest is the preset's
        if run.options["reduction_factor"]:
            chosen["reduction_factor"] = run.options["reduction_factor"]
        if run.options["adapter_scaling"]:
            chosen["scaling"] = _scaling(run.options["adapter_scaling"])
        return preset(**chosen, **run.common)
    return build


REDUCTION = MethodOption("reduction_factor", "float", 0.0,
                         "bottleneck adapters: hidden size / bottleneck size; 0 = the preset's (16; parallel: 2)")
SCALING = MethodOption("adapter_scaling", "str", "",
                       "bottleneck adapters: the factor on each adapter's output, a number or 'learned' (one "
                       "trained scalar) or 'channel' (one per feature); empty = the preset's (1; parallel: 4)")
register_recipe(Recipe("houlsby", "Houlsby bottleneck adapters (2019) after attention and feed-forward blocks",
                       _recipe(DoubleSeqBnConfig), options=(REDUCTION, SCALING)))
register_recipe(Recipe("pfeiffer", "Pfeiffer bottleneck adapter (2020) after the feed-forward block",
                       _recipe(SeqBnConfig)))
register_recipe(Recipe("parallel", "parallel bottleneck adapter (He et al. 2022) beside the feed-forward block",
                       _recipe(ParBnConfig)))
