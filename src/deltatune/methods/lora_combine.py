"""LoRA's part in adapter arithmetic (``dt.combine``): a plain LoRA layer change is ``s * B @ A``.

Registered for ``LoraDelta`` exactly: a DoRA delta subclasses it but rescales ``W + s B A`` by a
learned magnitude per output, which no combination rule covers, so DoRA adapters are refused.
A combined adapter is a LoRA adapter whose factors already hold every scaling: ``lora_alpha = r``
(s = 1), as peft's ``add_weighted_adapter`` writes it, and without rsLoRA, whose ``alpha / sqrt(r)``
would scale the result again (peft keeps the first adapter's flag there; the factors assume 1).
"""

from __future__ import annotations

from ..config import DeltaConfig
from ..factor_form import FactorForm, Factors, register_factor_form
from ..layer import Delta
from .lora import LoraConfig, LoraDelta


def _factors(delta: Delta) -> Factors:
    """The live factors at the adapter's own rank: a hot-swap slot padded past it (``dt.prepare_hotswap``)
    holds zero rows beyond, which belong to no adapter (and would give two rank-2 adapters rank 4)."""
    assert isinstance(delta, LoraDelta)
    a, b = delta.adapter_factors()  # views: a layer's cut keeps the leading ranks
    return b, a, delta.scaling


def _max_rank(config: DeltaConfig) -> int:
    """peft's rule: ``r``, or the largest rank in ``rank_pattern`` when that is larger."""
    assert isinstance(config, LoraConfig)
    return max([config.r, *config.rank_pattern.values()])


def _combined_config(config: DeltaConfig, rank: int) -> DeltaConfig:
    """Rank ``rank`` everywhere at scaling 1; the plain init, so that planning never moves part of the
    base weight into the new factors (a PiSSA / OLoRA init would), as they are overwritten anyway."""
    assert isinstance(config, LoraConfig)
    return config.replace(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False,
                          init_lora_weights=True)


register_factor_form(LoraConfig, FactorForm(LoraDelta, _factors, _max_rank, _combined_config))
