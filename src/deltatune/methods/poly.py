"""Polytropon: a task-routed mixture of LoRA skills per layer (Ponti et al. 2022, "Combining
Modular Skills in Multitask Learning"; with ``n_splits > 1``, Multi-Head Routing, Caccia et al. 2022).

Each adapted linear layer holds ``n_skills`` LoRA skills, each cut into ``n_splits`` blocks
along its input and output, and a router with one logit per (task, split, skill):
``module_logits: (n_tasks, n_splits * n_skills)``. For a row of task ``t`` the mixing weights are
``w[q, s] = g[q, s] / (Σ_s' g[q, s'] + 1e-12)`` with ``g = sigmoid(logits[t])`` in eval mode and a
relaxed-Bernoulli sample (temperature 1) of the same logits in training. The row's factors are
``A[q] = Σ_s w[q, s] A[q, s]`` (``(in / n_splits, r)`` blocks stacked along the input) and
``B[q] = Σ_s w[q, s] B[q, s]`` (``(r, out / n_splits)`` blocks side by side along the output), and
the layer computes ``y + x A B / r``. Init (peft's): A Kaiming-uniform per skill and split, B zero
(``init_weights=False``: Kaiming-uniform too), logits uniform in ±1e-3.

Task ids reach the layers as in peft: ``model(..., task_ids=tensor)`` and
``model.generate(..., task_ids=tensor)`` (one task per batch row; a batch ``k`` times as long,
beams, repeats each row's task ``k`` times in place), or ``with dt.poly_tasks(model, ids): ...``.
A composition that gives a Poly adapter only some rows of a batch (``dt.routing`` with other
adapters, ``BatchSplit``, ``Parallel``) is refused: rows would meet other rows' tasks. The change
depends on the row's task, so it cannot be merged into the weight.

Files are peft's: ``<layer>.poly_lora_A``, ``<layer>.poly_lora_B``, ``<layer>.poly_router.module_logits``.
Parameter count per layer: ``n_skills * r * (in + out) + n_tasks * n_splits * n_skills``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..bases import BaseLayer
from ..compose import Composition, splits_rows
from ..config import DeltaConfig, TargetedConfig
from ..values import is_positive_int
from ..errors import AdapterError, TargetError
from ..layer import Delta, ModelDelta
from ..registry import Method, register
from ..routing import register_call_keyword
from ..state import state_of

EPS = 1e-12
"""Added to the sum of a split's skill weights before dividing (peft's and mttl's value)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolyConfig(TargetedConfig):
    """Poly settings, with peft's field names and defaults."""

    peft_type: ClassVar[str] = "POLY"

    r: int = 8
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def validate(self) -> None:
        super().validate()
        for field in ("r", "n_tasks", "n_skills", "n_splits"):
            self.check(is_positive_int(getattr(self, field)), field, f"{field} must be a positive integer",
                       f"pass e.g. {field}=2")
        self.check(self.poly_type == "poly", "poly_type", "only 'poly' is defined (as in peft)", "pass poly_type='poly'")
        self.check(isinstance(self.init_weights, bool), "init_weights", "init_weights must be a bool",
                   "pass True (B starts at zero) or False")
        for field in ("layers_to_transform", "layers_pattern"):
            self.check(getattr(self, field) is None, field, f"peft's PolyConfig has no {field}",
                       "select layers through target_modules (a regular expression) instead")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        del out["layers_to_transform"], out["layers_pattern"]  # not PolyConfig fields in peft
        return out


class PolyTasks(ModelDelta):
    """One Poly adapter's part of the model: the task of each row of the call in progress."""

    mergeable: ClassVar[bool] = False

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.task_ids: Tensor | None = None

    def for_rows(self, rows: int, device: torch.device) -> Tensor:
        """The task of each of ``rows`` rows (the call's ids, each repeated in place for a longer batch)."""
        ids = self.task_ids
        if ids is None:
            raise AdapterError("a Poly adapter is active but the call gave no task ids: pass task_ids=tensor([...]) "
                               "(one task per batch row) to the model's forward or generate, or run it inside "
                               "`with dt.poly_tasks(model, ids):`")
        if rows % ids.numel():
            raise AdapterError(f"task_ids names {ids.numel()} rows but a Poly layer sees a batch of {rows}; give one "
                               "task id per row of the batch")
        if int(ids.max()) >= self.n_tasks:
            raise AdapterError(f"task id {int(ids.max())} is out of range: this Poly adapter was made for "
                               f"n_tasks={self.n_tasks} (ids 0..{self.n_tasks - 1})")
        return ids.to(device).repeat_interleave(rows // ids.numel())

    @classmethod
    def check_active(cls, model: nn.Module, active: Mapping[str, ModelDelta], composition: Composition) -> None:
        if splits_rows(composition):
            raise AdapterError(f"{composition!r} gives the Poly adapters {sorted(active)} only some rows of a batch, but "
                               "their task ids are given per call for the whole batch. Activate them for whole "
                               "batches (dt.set_active) and run rows of other adapters in separate calls.")



@contextmanager
def poly_tasks(model: nn.Module, task_ids: Any) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every call belongs to task ``task_ids[i]`` for the model's Poly
    adapters (what ``task_ids=`` on forward and generate does for one call)."""
    ids = torch.as_tensor(task_ids)
    if ids.dim() != 1 or not ids.numel() or ids.is_floating_point() or ids.is_complex() or int(ids.min()) < 0:
        raise AdapterError(f"task_ids must be a 1-D tensor of non-negative integer task ids, one per row, got {task_ids!r}")
    parts = [p for p in state_of(model).model_deltas.values() if isinstance(p, PolyTasks)]
    if not parts:
        raise AdapterError("task_ids= is given but no adapter on this model takes task ids (Poly); drop the keyword")
    before = [p.task_ids for p in parts]
    for part in parts:
        part.task_ids = ids.long()
    try:
        yield model
    finally:
        for part, ids_before in zip(parts, before):
            part.task_ids = ids_before


class PolyRouter(nn.Module):
    """The per-task logits of one layer (its own module, so the keys are peft's)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int, device: torch.device) -> None:
        super().__init__()
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, device=device))


class PolyDelta(Delta):
    """``y + x A(t) B(t) / r`` with the factors mixed from the skills for each row's task ``t``."""

    def __init__(self, base: BaseLayer, config: PolyConfig, tasks: PolyTasks) -> None:
        super().__init__()
        splits, skills, r = config.n_splits, config.n_skills, config.r
        self.base, self.r, self.splits, self.skills = base, r, splits, skills
        self.tasks = tasks  # a child of every layer delta of the adapter (no tensors): where task ids are read
        device = base.weight.device
        self.poly_lora_A = nn.Parameter(torch.empty(splits, skills, base.in_features // splits, r, device=device))
        self.poly_lora_B = nn.Parameter(torch.empty(splits, skills, r, base.out_features // splits, device=device))
        self.poly_router = PolyRouter(config.n_tasks, splits, skills, device)

    def mixing_weights(self, rows: int) -> Tensor:
        """``(rows, n_splits, n_skills)``: each row's skill weights per split (noisy in training)."""
        logits = self.poly_router.module_logits
        picked = logits[self.tasks.for_rows(rows, logits.device)].view(-1, self.splits, self.skills)
        gates = RelaxedBernoulli(picked.new_tensor(1.0), logits=picked).rsample() if self.training else torch.sigmoid(picked)
        return gates / (gates.sum(dim=-1, keepdim=True) + EPS)

    def contribution(self, x: Tensor, y: Tensor) -> Tensor:
        rows = x.shape[0]
        weights = self.mixing_weights(rows)
        a = torch.einsum("bqs,qsdr->bqdr", weights, self.poly_lora_A).reshape(rows, self.base.in_features, self.r)
        b = torch.einsum("bqs,qsrd->bqrd", weights, self.poly_lora_B)
        b = b.transpose(1, 2).reshape(rows, self.r, self.base.out_features)
        tokens = x.to(a.dtype).reshape(rows, -1, self.base.in_features)  # (rows, tokens, in): peft's bmm layout
        change = tokens.bmm(a).bmm(b) / self.r
        return change.reshape(*x.shape[:-1], self.base.out_features)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (y + self.contribution(x, y)).to(y.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"poly_lora_A": self.poly_lora_A, "poly_lora_B": self.poly_lora_B,
                "poly_router.module_logits": self.poly_router.module_logits}

    @torch.no_grad()
    def initialize(self, init_weights: bool) -> None:
        """peft's init: each (split, skill) block Kaiming-uniform as a ``(r, in/splits)`` Linear weight,
        transposed; B zero (or likewise Kaiming-uniform); router logits uniform in ±1e-3."""
        for factor in (self.poly_lora_A, self.poly_lora_B) if not init_weights else (self.poly_lora_A,):
            for skill in range(self.skills):  # peft's order of draws
                for split in range(self.splits):
                    block = torch.empty(factor.shape[3], factor.shape[2])
                    nn.init.kaiming_uniform_(block, a=math.sqrt(5))
                    factor[split, skill] = block.T
        if init_weights:
            nn.init.zeros_(self.poly_lora_B)
        nn.init.uniform_(self.poly_router.module_logits, -1e-3, 1e-3)


def make_tasks(model: nn.Module, config: DeltaConfig, views: Mapping[str, BaseLayer]) -> PolyTasks:
    assert isinstance(config, PolyConfig)
    return PolyTasks(config.n_tasks)


def make_poly(base: BaseLayer, config: DeltaConfig, key: str, shared: ModelDelta | None = None) -> PolyDelta:
    assert isinstance(config, PolyConfig) and isinstance(shared, PolyTasks)
    if base.kind != "linear":
        raise TargetError(f"Poly cannot adapt {key!r}, a {base.describe()}: it adapts linear layers only (as peft). "
                          "Fix: narrow target_modules to linear layers.")
    uneven = [f"{side}={n}" for side, n in (("in", base.in_features), ("out", base.out_features)) if n % config.n_splits]
    if uneven:
        raise TargetError(f"Poly cannot split {key!r} ({', '.join(uneven)}) into n_splits={config.n_splits} equal "
                          "blocks; pick n_splits dividing both sizes, or exclude the layer")
    delta = PolyDelta(base, config, shared)
    delta.initialize(config.init_weights)
    return delta


POLY = register(Method("POLY", PolyConfig, make_poly, make_model_delta=make_tasks))
register_call_keyword("task_ids", poly_tasks)
