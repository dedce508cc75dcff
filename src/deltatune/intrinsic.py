"""Training in a random d-dimensional subspace: theta = theta0 + P z (Li et al. 2018; Aghajanyan et al. 2020).

``enter_subspace(model, dim)`` takes the model's trainable parameters (an attached adapter's, or
every parameter of a plain model), D values in all, freezes them and trains ``z`` in R^d instead
(initialised at 0), with P a fixed random projection R^d -> R^D (``projections.py``). With
``said=True`` (Aghajanyan et al.'s SAID) each parameter tensor t also gets a learned scale
lambda_t (initialised at 1, counted in d): theta_t = theta0_t + lambda_t (P z)_t.

How the forward sees theta: a pre-hook on the model computes ``P z`` once (one product for all
tensors), splits it into views, and puts ``theta0_t + view`` where each parameter was (in its
modules' ``_parameters``); a hook that runs even when the forward raises puts the parameters back.
Gradients therefore reach only ``z`` (and the scales). The parameters themselves always hold the
current theta as plain values: ``sync()`` (run by the trainer after every optimizer step, and by
the pre-hook whenever ``z`` changed) writes it, so evaluation, ``dt.save`` and checkpoints see
the trained model without knowing about the subspace. ``bake()`` ends the subspace: the
parameters keep theta and train again, and ``z`` leaves the model; ``discard()`` restores theta0.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import ConfigError, TrainingError
from .values import is_int
from .projections import PROJECTIONS, make_projection

SUBSPACE_ATTR = "deltatune_subspace"
"""Where the subspace (its z, scales and projection) sits in the model, so optimizers find z."""
Location = tuple[nn.Module, str]


class IntrinsicSubspace(nn.Module):
    """The trained coordinates ``z`` (and SAID scales) of a model's trainable parameters; see the module docstring."""

    def __init__(self, params: list[nn.Parameter], locations: list[list[Location]], dim: int, projection: str,
                 seed: int, said: bool) -> None:
        super().__init__()
        self.dim, self.total, self.said = dim, sum(p.numel() for p in params), said
        device = params[0].device
        coordinates = dim - len(params) if said else dim
        self.projection = make_projection(projection, coordinates, self.total, seed).to(device)
        self.z = nn.Parameter(torch.zeros(coordinates, device=device))
        self.scales = nn.Parameter(torch.ones(len(params) if said else 0, device=device), requires_grad=said)
        for i, p in enumerate(params):  # theta0, moved with the model by .to()
            self.register_buffer(f"start_{i}", p.detach().clone(), persistent=False)
        self.split_sizes = [p.numel() for p in params]
        self.sizes: Tensor
        self.register_buffer("sizes", torch.tensor(self.split_sizes, device=device), persistent=False)
        # plain lists: module attributes holding modules would make the model a child of itself
        self.params, self.locations = params, locations
        self.saved: list[tuple[nn.Module, str, nn.Parameter]] = []
        self.depth, self.synced = 0, (-1, -1)
        self.handles: list[RemovableHandle] = []

    def forward(self, x: Any) -> Any:
        """The identity: a container model (``nn.Sequential``) calls every child, the subspace too."""
        return x

    def starts(self) -> list[Tensor]:
        return [getattr(self, f"start_{i}") for i in range(len(self.params))]

    def values(self) -> list[Tensor]:
        """theta_t = theta0_t + (lambda_t) (P z)_t for every tensor, from one projection."""
        delta = self.projection(self.z)
        if self.said:
            delta = delta * self.scales.repeat_interleave(self.sizes)
        parts = delta.split(self.split_sizes)
        return [start + part.view_as(start).to(start.dtype) for start, part in zip(self.starts(), parts)]

    @torch.no_grad()
    def sync(self) -> None:
        """Write the current theta into the parameters (skipped when z and the scales are unchanged)."""
        if (self.z._version, self.scales._version) != self.synced:
            self.store(self.values())

    @torch.no_grad()
    def store(self, values: list[Tensor]) -> None:
        for param, value in zip(self.params, values):
            param.copy_(value)
        self.synced = (self.z._version, self.scales._version)

    def after_step(self, step: int) -> None:
        """A trainer callback: the parameters hold theta after every optimizer step."""
        self.sync()

    def record(self) -> dict[str, float]:
        """d and D, as a run's metrics record them."""
        return {"intrinsic_dim": float(self.dim), "intrinsic_params": float(self.total)}

    # -- the forward: theta in place of the parameters ------------------------------------
    def before_forward(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth > 1:  # a nested call of the model runs inside the outer swap
            return
        if not (torch.is_grad_enabled() and (self.z.requires_grad or self.scales.requires_grad)):
            self.sync()  # no graph needed: the parameters hold theta
            return
        try:
            values = self.values()
        except BaseException:
            self.depth -= 1  # the next forward must not take itself for a nested call
            raise
        self.store(values)  # the parameters follow z even when no optimizer step calls sync()
        for param, value, places in zip(self.params, values, self.locations):
            for owner, name in places:
                self.saved.append((owner, name, param))
                owner._parameters[name] = value  # type: ignore[assignment]  # a tensor with a graph to z

    def after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self.put_back()

    def put_back(self) -> None:
        while self.saved:
            owner, name, param = self.saved.pop()
            owner._parameters[name] = param

    # -- the end ------------------------------------------------------------------------
    def bake(self) -> None:
        """Keep theta in the parameters, make them trainable again and take ``z`` out of the model."""
        owner = self._owner()
        self.sync()
        self._leave(owner)

    @torch.no_grad()
    def discard(self) -> None:
        """Put theta0 back into the parameters (trainable again) and take ``z`` out of the model."""
        owner = self._owner()
        for param, start in zip(self.params, self.starts()):
            param.copy_(start)
        self._leave(owner)

    def _owner(self) -> nn.Module:
        owner: nn.Module | None = self.__dict__.get("owner")
        if owner is None:
            raise TrainingError("this subspace has already been baked or discarded; enter a new one with "
                                "enter_subspace(model, dim)")
        return owner

    def _leave(self, owner: nn.Module) -> None:
        self.put_back()
        for handle in self.handles:
            handle.remove()
        for param in self.params:
            param.requires_grad_(True)
        del owner._modules[SUBSPACE_ATTR]
        del self.__dict__["owner"]


def trainable_with_locations(model: nn.Module) -> tuple[list[nn.Parameter], list[list[Location]]]:
    """The trainable parameters (model order, each once) and every (module, name) that holds each."""
    params = [p for p in model.parameters() if p.requires_grad]
    where: dict[int, list[Location]] = {id(p): [] for p in params}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) in where:
                where[id(param)].append((module, name))
    return params, [where[id(p)] for p in params]


def check_dim(dim: int, total: int, tensors: int, said: bool) -> None:
    """d must leave z at least one coordinate and be no larger than the space it lives in."""
    where = "enter_subspace"
    if not is_int(dim):
        raise ConfigError(where, "dim", dim, "must be an integer", "pass e.g. dim=1000")
    if dim < 1:
        raise ConfigError(where, "dim", dim, "must be >= 1", "pass e.g. dim=1000 (--intrinsic-dim 1000)")
    low = tensors + 1 if said else 1
    if said and dim < low:
        raise ConfigError(where, "dim", dim, f"must exceed the {tensors} per-tensor scales SAID learns",
                          f"pass a dim of at least {low}, or said=False")
    if dim - (tensors if said else 0) > total:
        raise ConfigError(where, "dim", dim, f"exceeds D={total}, the number of trainable values",
                          f"pass a dim of at most {total}, or train the parameters directly")


def enter_subspace(model: nn.Module, dim: int, projection: str = "fastfood", seed: int = 0,
                   said: bool = False) -> IntrinsicSubspace:
    """Train ``model``'s trainable parameters in a random ``dim``-dimensional subspace (module docstring).

    Returns the subspace; its ``z`` (and scales) are now the model's only trainable parameters.
    On any error the model is left unchanged.
    """
    if SUBSPACE_ATTR in model._modules:
        raise TrainingError(f"{type(model).__name__} already trains in a subspace; bake() or discard() it first")
    if projection not in PROJECTIONS:
        raise ConfigError("enter_subspace", "projection", projection, f"must be one of {PROJECTIONS}",
                          "use fastfood (any size) or dense (small D x d)")
    params, locations = trainable_with_locations(model)
    if not params:
        raise TrainingError(f"{type(model).__name__} has no trainable parameters to project: attach an adapter "
                            "first (dt.attach), or leave the parameters of a plain model trainable")
    check_dim(dim, sum(p.numel() for p in params), len(params), said)
    space = IntrinsicSubspace(params, locations, dim, projection, seed, said)  # builds all, changes nothing
    for param in params:
        param.requires_grad_(False)
    model.add_module(SUBSPACE_ATTR, space)
    space.__dict__["owner"] = model  # not a submodule: the model is not a child of its own subspace
    space.handles = [model.register_forward_pre_hook(space.before_forward, prepend=True),
                     model.register_forward_hook(space.after_forward, always_call=True)]
    return space


def subspace_of(model: nn.Module) -> IntrinsicSubspace | None:
    """The subspace ``model`` trains in, or None."""
    space = model._modules.get(SUBSPACE_ATTR)
    return space if isinstance(space, IntrinsicSubspace) else None


def _lookup(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]``, or the value under ``key`` in one of its nested mappings (options, metrics, ...)."""
    if key in row:
        return row[key]
    for value in row.values():
        if isinstance(value, Mapping) and key in value:
            return value[key]
    return None


def d90(results: Iterable[Mapping[str, Any]], metric: str, reference: float, fraction: float = 0.9,
        dim_key: str = "intrinsic_dim") -> int | None:
    """The smallest d at which ``metric`` reaches ``fraction`` x ``reference`` (full fine-tuning's
    metric); None when no d does.

    ``results`` are sweep rows (plain dicts, e.g. the lines of a sweep's JSONL); ``metric`` and
    ``dim_key`` are read from a row or from a mapping inside it. A cell's value is its mean over
    seeds (rows with the same ``cell`` name, as ``deltatune sweep`` writes; rows without one group
    by d alone), and d counts with its best cell, so a sweep over d x learning rate gives each d its
    best rate. Rows without a positive d (the reference run) or without the metric (a failed run)
    are skipped. Assumes a larger metric is better.
    """
    cells: dict[tuple[int, Any], list[float]] = {}
    for row in results:
        dim, value = _lookup(row, dim_key), _lookup(row, metric)
        if isinstance(dim, (int, float)) and dim > 0 and isinstance(value, (int, float)):
            cells.setdefault((int(dim), row.get("cell")), []).append(float(value))
    reached = [dim for (dim, _), values in cells.items() if statistics.fmean(values) >= fraction * reference]
    return min(reached, default=None)
