"""Adapter arithmetic: a new adapter made from weighted combinations of existing ones (``dt.combine``).

The semantics are those of peft's ``add_weighted_adapter``, for every adapter whose method
declares its layer changes to be scaled low-rank products ``ΔW_i = s_i B_i A_i`` (``factor_form``).
Per adapted layer, over the adapters present there, in the order of ``weights``:

- "factors" methods (linear, ties, dare_linear, dare_ties, magnitude_prune) mix the A's together
  and the B's together, weighting both sides by ``sqrt(|w_i s_i|)`` (the sign on A only); a single
  adapter is reproduced exactly, several are not their weighted sum. One rank for all.
- "cat" stacks the factors along the rank (A's times ``w_i s_i``): exactly ``Σ w_i ΔW_i``, with
  rank the sum of the ranks.
- "svd" methods mix the dense ``ΔW_i`` and keep the top ``svd_rank`` singular triplets.

A change that is one product per expert (``combine_layer.ExpertFactors``: a change of a fused 3-D
expert weight) is combined expert by expert, each as its own matrix, at the same rank per expert.

The result is a new adapter of the first adapter's method and settings, rank as above and
scaling 1, built like any attach (``inject.plan``, fill the planned factors, ``inject.apply``), so
it saves, loads and runs as any other. Every check comes before the model changes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from .combine_args import checked_weights, require, settings
from .combine_layer import Arithmetic, LayerParts, Part, as_expert_factors, combined
from .config import DeltaConfig, TargetedConfig
from .errors import AdapterError
from .factor_form import FactorForm, factor_form
from .inject import AttachPlan, apply, plan
from .state import delta_layers, saved_modules, state_of


def combine(model: nn.Module, weights: Mapping[str, float], method: str = "svd", *, name: str,
            density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
            svd_clamp: float | None = None, svd_full_matrices: bool = True, svd_driver: str | None = None,
            generator: torch.Generator | int | None = None, weighting: str | None = None) -> nn.Module:
    """Add adapter ``name``, the ``method`` combination of the adapters in ``weights`` (name -> weight,
    negative allowed); returns the model. See docs/combining.md for each method and option.

    ``density``: the fraction of entries kept by ties / dare / magnitude_prune methods, in (0, 1].
    ``generator``: a torch.Generator or an int seed for DARE's random draws (default: torch's global RNG).
    ``weighting="inverse_norm"``: per layer, ``w_i`` becomes ``w_i (1/‖ΔW_i‖) / Σ_j (1/‖ΔW_j‖)``.
    Like ``dt.attach``, the new adapter is active only when nothing else is; it is frozen, as peft's.
    """
    arith = settings(method, density, majority_sign_method, svd_rank, svd_clamp, svd_full_matrices, svd_driver,
                     generator, weighting)
    state = state_of(model)
    weights = checked_weights(state, weights)
    form, configs = _common_form({n: state.configs[n] for n in weights})
    if len(weights) == 1:  # peft: one adapter is always combined linearly (reproduced exactly)
        arith = replace(arith, op="linear", form="factors")
    layers = _layers(model, weights, form)
    rank = _rank(arith, {n: form.max_rank(c) for n, c in configs.items()})
    owners = _copy_owners(model, list(weights))
    attach_plan = plan(model, _new_config(configs, form, rank), name)
    _check_layers(attach_plan, layers, arith, rank)
    _take_copies(model, attach_plan, owners)
    for layer in layers:
        _fill(form, attach_plan.deltas[layer.key], *combined(layer, arith, rank))
    apply(model, attach_plan)
    return model


def _common_form(configs: dict[str, DeltaConfig]) -> tuple[FactorForm, dict[str, TargetedConfig]]:
    """The factor form all the adapters share (one method, one form), else an error naming the odd one."""
    forms: dict[str, FactorForm] = {}
    targeted: dict[str, TargetedConfig] = {}
    for name, config in configs.items():
        form = factor_form(config) if isinstance(config, TargetedConfig) else None
        if form is None:
            raise AdapterError(
                f"dt.combine: adapter {name!r} ({type(config).__name__}) cannot be combined: combining needs every "
                "layer change to be a low-rank product s·B·A, and its method declares none (activation adapters, "
                "prompts and per-feature scalings, for example, are not). Combine adapters of one low-rank method.")
        assert isinstance(config, TargetedConfig)
        forms[name], targeted[name] = form, config
    if len(set(forms.values())) > 1:
        kinds = {n: type(c).__name__ for n, c in configs.items()}
        raise AdapterError(f"dt.combine: the adapters belong to different methods ({kinds}); the result must be "
                           "one adapter of one method. Combine adapters of the same method.")
    return next(iter(forms.values())), targeted


def _layers(model: nn.Module, weights: dict[str, float], form: FactorForm) -> list[LayerParts]:
    """Every layer that one of the adapters changes, with their factors there (in ``weights`` order)."""
    found = []
    for key, layer in delta_layers(model):
        parts, experts = [], set()
        for name, weight in weights.items():
            if name not in layer.deltas:
                continue
            delta = layer.delta(name)
            batch = as_expert_factors(delta)
            if batch is None and type(delta) is not form.delta_class:
                raise AdapterError(
                    f"dt.combine: adapter {name!r} changes {key!r} with a {type(delta).__name__}, which is not a plain "
                    f"low-rank product s·B·A (it rescales or reshapes it further), so it has no combination rule. "
                    f"Leave {name!r} out of the weights.")
            b, a, scaling = form.factors(delta) if batch is None else batch.expert_factors()
            experts.add(None if batch is None else b.shape[0])
            parts.append(Part(name, weight, b.detach(), a.detach(), scaling))
        if parts:
            found.append(LayerParts(key, layer.view, parts, _one_layout(key, experts)))
    return found


def _one_layout(key: str, experts: set[int | None]) -> int | None:
    """The number of experts all the adapters agree on at ``key`` (None: plain matrices)."""
    if len(experts) > 1:
        forms = sorted(experts, key=str)
        raise AdapterError(f"dt.combine: the adapters change {key!r} in different forms (experts: {forms}, None "
                           "meaning one plain matrix), which have no common combination. "
                           "Combine adapters that adapt this layer in the same way.")
    return next(iter(experts))


def _rank(arith: Arithmetic, ranks: dict[str, int]) -> int:
    """The rank of the result (peft's rule): the shared rank, the sum (cat) or svd_rank / the largest (svd)."""
    if arith.form == "cat":
        return sum(ranks.values())
    if arith.form == "svd":
        return arith.svd_rank or max(ranks.values())
    if len(set(ranks.values())) > 1:
        raise AdapterError(
            f"dt.combine: method {arith.method!r} mixes the adapters' factors entry by entry, so they need one rank, "
            f"but their ranks are {ranks}. Use method='cat' (exact; rank = the sum) or an svd method (e.g. 'svd').")
    return next(iter(ranks.values()))


def _new_config(configs: Mapping[str, TargetedConfig], form: FactorForm, rank: int) -> TargetedConfig:
    """The first adapter's settings at ``rank`` and scaling 1, targeting what any adapter targets (peft's
    rule), and saving the modules any of them saves; frozen, as peft freezes the result."""
    first = next(iter(configs.values()))
    saved = tuple(dict.fromkeys(n for c in configs.values() for n in c.modules_to_save or ()))
    config = form.combined_config(first, rank)
    assert isinstance(config, TargetedConfig)
    return config.replace(target_modules=_union_targets(configs), modules_to_save=saved or None, inference_mode=True)


def _union_targets(configs: Mapping[str, TargetedConfig]) -> tuple[str, ...] | str:
    targets = [c.target_modules for c in configs.values()]
    if all(isinstance(t, tuple) for t in targets):
        return tuple(sorted({name for t in targets for name in t or ()}))
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    found = {n: c.target_modules for n, c in configs.items()}
    raise AdapterError(f"dt.combine: the adapters' target_modules mix lists and regular expressions ({found}); "
                       "they cannot be joined into one selection (peft refuses too). Combine adapters whose "
                       "target_modules are all lists or all regular expressions.")


def _check_layers(attach_plan: AttachPlan, layers: list[LayerParts], arith: Arithmetic, rank: int) -> None:
    """The planned adapter covers exactly the layers the adapters change, and each can take the result."""
    _check_selection(set(attach_plan.deltas), {layer.key for layer in layers})
    for layer in layers:
        if layer.experts is not None:
            _check_experts(layer, attach_plan.deltas[layer.key], rank)
        matrix = layer.matrices()[0]  # the experts of one layer share their shapes
        if arith.form == "factors":
            _check_one_rank(matrix, arith, rank)
        elif arith.form == "svd":
            _check_svd_fits(matrix, arith, rank)


def _check_experts(layer: LayerParts, planned: nn.Module, rank: int) -> None:
    """The result's planned change at a batch-of-experts layer is one too, with room for ``rank`` per expert."""
    batch = as_expert_factors(planned)
    part = layer.parts[0]
    want = ((layer.experts, part.b.shape[1], rank), (layer.experts, rank, part.a.shape[2]))
    got = None if batch is None else tuple(tuple(t.shape) for t in batch.expert_factors()[:2])
    if got != want:
        raise AdapterError(f"dt.combine: the combined adapter would change {layer.key!r} ({layer.view.describe()}) "
                           f"with factors shaped {got}, not per-expert factors {want}; its method cannot hold this "
                           "combination there. Leave the adapters that change it out of the weights.")


def _check_selection(planned: set[str], wanted: set[str]) -> None:
    if wanted == planned:
        return
    odd = [f"{what} {sorted(keys)[:3]}" for what, keys in (("would adapt, where no adapter is,", planned - wanted),
                                                            ("would miss", wanted - planned)) if keys]
    raise AdapterError(
        f"dt.combine: the combined adapter's selection (the union of the target_modules, with the first "
        f"adapter's exclude_modules and layers_to_transform, as peft builds it) {' and '.join(odd)}. "
        "Combine adapters whose exclude_modules and layers_to_transform agree.")


def _check_one_rank(layer: LayerParts, arith: Arithmetic, rank: int) -> None:
    """Mixing factors entry by entry needs them all at the result's rank (a rank_pattern can break that)."""
    ranks = {p.name: p.a.shape[0] for p in layer.parts if p.a.shape[0] != rank}
    if ranks:
        raise AdapterError(
            f"dt.combine: method {arith.method!r} needs rank {rank} on every layer, but on {layer.key!r} "
            f"the ranks are {ranks} (rank_pattern). Use method='cat' or an svd method.")


def _check_svd_fits(layer: LayerParts, arith: Arithmetic, rank: int) -> None:
    """An SVD of an ``out x in`` change has at most ``min(out, in)`` triplets to keep."""
    part = layer.parts[0]
    largest = min(part.b.shape[0], part.a[0].numel())
    require(rank <= largest, "svd_rank", arith.svd_rank,
            f"the result would have rank {rank}, but {layer.key!r} ({layer.view.describe()}) has rank at most "
            f"{largest}", f"pass svd_rank={largest} or lower")
    require(arith.driver is None or part.b.device.type == "cuda", "svd_driver", arith.driver,
            f"torch chooses among SVD drivers only on CUDA, and {layer.key!r} is on {part.b.device}",
            "leave svd_driver unset")


def _copy_owners(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module -> the one adapter among ``names`` that keeps a trained copy of it (``modules_to_save``)."""
    owners = {}
    for key, module in saved_modules(model):
        holders = [n for n in names if n in module.copies]
        if len(holders) > 1:
            raise AdapterError(
                f"dt.combine: adapters {holders} each keep a trained copy of {key!r} (modules_to_save); whole copies "
                "have no combination (peft refuses too). Combine adapters that keep copies of different modules.")
        if holders:
            owners[key] = holders[0]
    return owners


def _take_copies(model: nn.Module, attach_plan: AttachPlan, owners: dict[str, str]) -> None:
    """The result keeps a copy of each trained copy (peft would start it from the untrained original);
    a tensor the sources' copies share (a tied head and embedding, ``DeltaConfig.ties_saved_copies``)
    is shared by the result's copies too."""
    lost = sorted(set(owners) - set(attach_plan.saved))
    if lost:
        raise AdapterError(
            f"dt.combine: the combined adapter takes the first adapter's task_type, which would not save the "
            f"trained copies of {lost} that {[owners[k] for k in lost]} keep. "
            "Put the adapter with the task head first.")
    wrappers = dict(saved_modules(model))
    memo: dict[int, object] = {}  # one memo for every copy: copied one by one, a tie would come apart
    for key, owner in owners.items():
        attach_plan.saved[key] = copy.deepcopy(wrappers[key].copies[owner], memo)


def _fill(form: FactorForm, delta: nn.Module, b: Tensor, a: Tensor) -> None:
    batch = as_expert_factors(delta)
    if batch is not None:
        target_b, target_a, _ = batch.expert_factors()  # views of the live factors: copying fills them
    else:
        assert isinstance(delta, form.delta_class)
        target_b, target_a, _ = form.factors(delta)
    with torch.no_grad():
        target_b.copy_(b.reshape(target_b.shape))
        target_a.copy_(a.reshape(target_a.shape))
