"""LoRA inits that take the adapter from the layer's own weight: PiSSA, OLoRA and LoftQ.

PiSSA (Meng et al. 2024): the top-r singular triplets of ``W = U S Vᵀ`` split evenly between the
factors, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_rᵀ``, so ``s B A`` is W's best rank-r
part (``pissa_niter_K``: the same from K subspace iterations of a randomized SVD, seeded so that
loading re-derives it). OLoRA
(Büyükakyüz 2024): ``W = Q R``, ``B = Q[:, :r]``, ``A = R[:r]``. Either way the base keeps the
residual ``W - s B A``, and r can be at most min(out, in). LoftQ (``lora_loftq.py``) instead
gives the base ``dequant(Q)``, its 4-bit quantization.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..bases import BaseLayer
from ..errors import ConfigError
from .lora_loftq import loftq_factors


def takes_weight(init: bool | str) -> bool:
    """Whether ``init`` builds A and B from the layer's weight (PiSSA, OLoRA, LoftQ)."""
    return init in ("pissa", "olora", "loftq") or (isinstance(init, str) and init.startswith("pissa_niter_"))


def factors_from_weight(weight: Tensor, r: int, scaling: float, init: str,
                        loftq: Mapping[str, int]) -> tuple[Tensor, Tensor, Tensor | None]:
    """(B, A, new base weight) for the fp32 canonical ``weight`` per ``init`` (see the module
    docstring); the base is None when it is the residual ``W - s B A``."""
    if init == "loftq":
        return loftq_factors(weight, r, loftq)
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        return q[:, :r], upper[:r], None
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, vh = seeded_svd_lowrank(weight, r, int(init.rsplit("_", 1)[1]))
    root = torch.sqrt(s / scaling)
    return u * root, root[:, None] * vh, None


def seeded_svd_lowrank(weight: Tensor, r: int, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vᵀ) of rank r by ``torch.svd_lowrank``'s algorithm (Halko et al. 2009, alg. 5.1), its random
    test matrix drawn from a fixed seed on the CPU instead of the global generator: the factors are then a
    function of the weight alone, so loading a saved ``pissa_niter_K`` adapter (``dt.load``, a run's
    eval / predict / merge) re-derives the residual training started from, on any device. Equals
    ``torch.svd_lowrank(weight, r, niter)`` run on the CPU right after ``torch.manual_seed(0)``."""
    tall = weight.shape[0] >= weight.shape[1]
    a = weight if tall else weight.t()  # torch's rule: work on the tall orientation
    test = torch.randn(a.shape[1], r, generator=torch.Generator().manual_seed(0)).to(a)
    q = torch.linalg.qr(a @ test).Q
    for _ in range(niter):
        q = torch.linalg.qr(a.t() @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u, s, vh = torch.linalg.svd(q.t() @ a, full_matrices=False)
    u = q @ u
    return (u, s, vh) if tall else (vh.t(), s, u.t())


def check_rank_fits(base: BaseLayer, init: bool | str, key: str, r: int, config_name: str,
                    pattern_entry: str | None) -> None:
    """PiSSA, OLoRA and LoftQ take r directions (singular vectors, columns of Q) from a weight that has
    only min(out, in) of them. Refuse a larger r here, while ``inject.plan`` builds the deltas and
    the model is still untouched. peft instead silently shrinks A and B to min(out, in), which
    leaves tensors that do not match the config's r. ``pattern_entry``: the rank_pattern key that
    set this layer's rank, if any."""
    out, fan_in = base.out_features, base.in_features
    limit = min(out, fan_in)
    if not takes_weight(init) or base.kind != "linear" or r <= limit:
        return  # other kinds: the init raises its own TargetError
    why = (f"init_lora_weights={init!r} takes the adapter's {r} directions from the weight of layer {key!r} "
           f"({base.describe()}, weight shape (out, in) = ({out}, {fan_in})), which has only min({out}, {fan_in}) "
           f"= {limit}")
    if pattern_entry is None:
        raise ConfigError(config_name, "r", r, why, f"lower r to at most {limit}, or give this layer a smaller "
                                                    f"rank with rank_pattern={{{key!r}: {limit}}}")
    raise ConfigError(config_name, "rank_pattern", {pattern_entry: r},
                      f"{why} (the rank_pattern entry {pattern_entry!r} sets its rank)",
                      f"lower that entry to at most {limit}, or put an entry for this layer before it, "
                      f"e.g. rank_pattern={{{key!r}: {limit}, ...}}")
