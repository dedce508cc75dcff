"""AdaLoRA's training side: the rank allocator the trainer calls every step, and the recipe.

See ``adalora`` for the method. ``AdaLoraScheduler.step(global_step)`` runs after ``backward``
and before ``zero_grad``; ``orth_loss()`` is added to the loss (peft's ``update_and_allocate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import AdapterError
from ..registry import Recipe, RecipeInput, register_recipe
from ..state import delta_layers, state_of
from .adalora import AdaLoraConfig, AdaLoraDelta


class AdaLoraScheduler:
    """The rank allocator of one trainable AdaLoRA adapter; call ``step(global_step)`` every step,
    after ``loss.backward()`` and before ``zero_grad()`` (peft's ``update_and_allocate``)."""

    def __init__(self, model: nn.Module, adapter: str | None = None) -> None:
        state = state_of(model)
        names = [n for n, c in state.configs.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
        if adapter is None and len(names) != 1:
            raise AdapterError(f"AdaLoraScheduler needs exactly one trainable AdaLoRA adapter, found {names}; "
                               "pass adapter=<name> (load with trainable=True to train a loaded one)")
        self.adapter = adapter or names[0]
        if self.adapter not in names:
            raise AdapterError(f"{self.adapter!r} is not a trainable AdaLoRA adapter; trainable ones: {names}")
        self.model = model
        self.deltas: dict[str, AdaLoraDelta] = {
            k: layer.deltas[self.adapter] for k, layer in delta_layers(model) if self.adapter in layer.deltas}  # type: ignore[misc]
        self.initial_budget = sum(d.lora_A.shape[0] for d in self.deltas.values())
        self.target_budget = self.config.target_r * len(self.deltas)
        self.smoothed: dict[int, Tensor] = {}
        self.uncertainty: dict[int, Tensor] = {}

    @property
    def config(self) -> AdaLoraConfig:
        config = state_of(self.model).require(self.adapter)
        assert isinstance(config, AdaLoraConfig)
        return config

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether to mask now): flat, then cubic decay, then flat."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.initial_budget - self.target_budget) * left**3 + self.target_budget), step % c.deltaT == 0

    def step(self, global_step: int) -> None:
        c = self.config
        final = (c.total_step or 0) - c.tfinal
        if global_step < final:
            self._update_importance()
            budget, now = self.budget(global_step)
            if now:
                self._mask_to(budget)
        elif global_step == final:  # the last allocation fixes the pattern; the statistics restart
            self._mask_to(self.budget(global_step)[0])
            self.smoothed, self.uncertainty = {}, {}
        else:
            with torch.no_grad():
                for delta in self.deltas.values():
                    delta.lora_E.masked_fill_(~delta.keep[:, None], 0.0)

    def orth_loss(self) -> Tensor:
        """``orth_reg_weight`` times the mean over P and Q matrices of ``||Q Qᵀ - I||_F`` / ``||Pᵀ P - I||_F``."""
        covs = [c for d in self.deltas.values() for c in (d.lora_A @ d.lora_A.T, d.lora_B.T @ d.lora_B)]
        norms = [torch.norm(c - torch.eye(*c.shape, dtype=c.dtype, device=c.device), p="fro") for c in covs]
        return self.config.orth_reg_weight * (sum(norms[1:], norms[0]) / len(norms)) if norms else torch.zeros(())

    @torch.no_grad()
    def _update_importance(self) -> None:
        c = self.config
        for delta in self.deltas.values():
            for param in (delta.lora_A, delta.lora_B, delta.lora_E):
                if param.grad is None:
                    raise AdapterError("AdaLoraScheduler.step needs gradients: call it after loss.backward() "
                                       "and before optimizer.zero_grad()")
                sensitivity = (param * param.grad).abs()
                smooth = c.beta1 * self.smoothed.get(id(param), torch.zeros_like(param)) + (1 - c.beta1) * sensitivity
                unc = self.uncertainty.get(id(param), torch.zeros_like(param))
                self.uncertainty[id(param)] = c.beta2 * unc + (1 - c.beta2) * (sensitivity - smooth).abs()
                self.smoothed[id(param)] = smooth

    def _score(self, param: Tensor) -> Tensor:  # sensitivity times uncertainty, per entry
        return self.smoothed[id(param)] * self.uncertainty[id(param)]

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        """Zero the Λ entries of the lowest-scored triplets so that ``budget`` remain (ties go too)."""
        scores = {key: self._score(d.lora_E).view(-1) + torch.cat(
            [self._score(d.lora_A).mean(dim=1, keepdim=True), self._score(d.lora_B).mean(dim=0).view(-1, 1)], 1).sum(1)
            for key, d in self.deltas.items()}
        cut = self.initial_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), cut)[0].item() if cut > 0 else -math.inf
        for key, delta in self.deltas.items():
            delta.keep.copy_(scores[key] > threshold)
            delta.lora_E.masked_fill_(~delta.keep[:, None], 0.0)
        pattern = {f"{key}.lora_E": tuple(d.keep.tolist()) for key, d in self.deltas.items()}
        state_of(self.model).configs[self.adapter] = self.config.replace(rank_pattern=pattern)


def adalora_from_options(run: RecipeInput) -> AdaLoraConfig:
    """Starts at rank ``1.5 r`` and prunes to ``r`` (the run's --r) between 10% and 80% of the steps."""
    options, steps = run.options, run.total_steps
    return AdaLoraConfig(init_r=max(options["r"] + 1, round(1.5 * options["r"])), target_r=options["r"],
                         total_step=steps, tinit=steps // 10, tfinal=steps // 5, lora_alpha=options["lora_alpha"],
                         lora_dropout=options["lora_dropout"], use_rslora=options["use_rslora"],
                         target_modules=run.target_modules or run.default_targets, **run.common)


def adalora_hooks(model: nn.Module) -> tuple[list[Callable[[int], None]], list[Callable[[], Tensor]]]:
    """The rank allocator after every step, and the orthogonality term in the loss."""
    allocator = AdaLoraScheduler(model)
    return [allocator.step], [allocator.orth_loss]


register_recipe(Recipe("adalora", "AdaLoRA (Zhang et al. 2023): SVD-form LoRA whose rank budget is reallocated "
                                  "during training, ending at --r", adalora_from_options, adalora_hooks))
