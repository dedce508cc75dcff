"""The arguments of ``dt.combine``: the methods it knows, and every check of what a caller passed.

Each refusal is a ConfigError naming the argument, its value, why and how to fix it, raised before
anything is read from the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .combine_layer import Arithmetic
from .combine_ops import OPS, SIGN_METHODS
from .errors import AdapterError, ConfigError
from .values import is_positive_int
from .state import ModelState

FAMILIES: dict[str, tuple[str, str]] = {
    "linear": ("linear", "factors"), "ties": ("ties", "factors"), "dare_linear": ("dare_linear", "factors"),
    "dare_ties": ("dare_ties", "factors"), "magnitude_prune": ("magnitude_prune", "factors"),
    "cat": ("linear", "cat"),
    "svd": ("linear", "svd"), "ties_svd": ("ties", "svd"), "dare_linear_svd": ("dare_linear", "svd"),
    "dare_ties_svd": ("dare_ties", "svd"), "magnitude_prune_svd": ("magnitude_prune", "svd"),
}
"""method -> (the ``combine_ops.OPS`` mix it applies, what it applies it to: "factors", "cat" or "svd")."""
WEIGHTINGS = (None, "inverse_norm")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def require(ok: bool, field: str, value: object, why: str, fix: str) -> None:
    if not ok:
        raise ConfigError("dt.combine", field, value, why, fix)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def settings(method: str, density: float | None, sign_method: str, svd_rank: int | None, svd_clamp: float | None,
             full_matrices: bool, driver: str | None, generator: torch.Generator | int | None,
             weighting: str | None) -> Arithmetic:
    require(method in FAMILIES, "method", method, f"the methods are {sorted(FAMILIES)}", "pass one of them, e.g. 'svd'")
    op, form = FAMILIES[method]
    _check_density(method, OPS[op].prune is not None, density)
    require(sign_method in SIGN_METHODS, "majority_sign_method", sign_method, f"it must be one of {SIGN_METHODS}",
            "pass 'total' (sign of the sum) or 'frequency' (most common sign)")
    _check_svd(method, form == "svd", svd_rank, svd_clamp, full_matrices, driver)
    require(weighting in WEIGHTINGS, "weighting", weighting, f"it must be one of {WEIGHTINGS}",
            "pass None (the weights as given) or 'inverse_norm'")
    require(generator is None or isinstance(generator, (torch.Generator, int)) and not isinstance(generator, bool),
            "generator", generator, "it must be a torch.Generator or an int seed", "pass e.g. generator=0")
    seeded = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    return Arithmetic(method, op, form, density, sign_method, svd_rank, svd_clamp, full_matrices, driver, seeded,
                      weighting == "inverse_norm")


def _check_density(method: str, prunes: bool, density: float | None) -> None:
    if not prunes:
        require(density is None, "density", density, f"{method!r} prunes nothing",
                "leave density unset, or pick a pruning method (ties, dare_*, magnitude_prune and their _svd forms)")
        return
    # 0 would drop everything (and DARE would divide by it); peft's "above 1 keeps all" is refused as a likely typo
    require(density is not None and _is_number(density) and 0 < density <= 1, "density", density,
            f"{method!r} keeps a fraction of each tensor's entries: a number in (0, 1]", "pass e.g. density=0.5")


def _check_svd(method: str, svd: bool, rank: int | None, clamp: float | None, full_matrices: bool,
               driver: str | None) -> None:
    for field, value in (("svd_rank", rank), ("svd_clamp", clamp), ("svd_driver", driver)):
        require(value is None or svd, field, value, f"{method!r} takes no SVD", "leave it unset or pick an svd method")
    require(rank is None or is_positive_int(rank), "svd_rank", rank,
            "it must be a positive integer", "pass e.g. svd_rank=8, or leave it unset (the largest rank)")
    require(clamp is None or _is_number(clamp) and 0 <= clamp <= 1, "svd_clamp", clamp,
            "it is a quantile, in [0, 1]", "pass e.g. svd_clamp=0.99")
    require(isinstance(full_matrices, bool), "svd_full_matrices", full_matrices, "it must be a bool",
            "pass True or False")
    require(driver in SVD_DRIVERS, "svd_driver", driver,
            f"it must be one of {SVD_DRIVERS} (torch.linalg.svd's, CUDA only)", "leave it unset on CPU")


def checked_weights(state: ModelState, weights: Mapping[str, float]) -> dict[str, float]:
    require(isinstance(weights, Mapping) and len(weights) > 0, "weights", weights,
            "it must map adapter names to their weights", "pass e.g. {'a': 0.7, 'b': 0.3}")
    for name, weight in weights.items():
        if name not in state.configs:
            raise AdapterError(f"dt.combine: no adapter named {name!r} on this model; its adapters are "
                               f"{list(state.configs)}. Name existing adapters in weights "
                               "(dt.load or dt.attach them first).")
        require(_is_number(weight), "weights", dict(weights), f"the weight of {name!r} is not a finite number",
                "give every adapter a number, e.g. 0.5 (negative subtracts)")
    return {name: float(weight) for name, weight in weights.items()}
