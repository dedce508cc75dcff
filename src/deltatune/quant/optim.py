"""AdamW with blockwise 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Each parameter of at least ``min_8bit_size`` values keeps its first moment ``m`` as uint8 codes of
the signed dynamic 8-bit map and its second moment ``v`` as codes of the unsigned dynamic map,
with one fp32 absmax per block of ``block_size`` values (256, as bitsandbytes' blockwise
optimizers): 2 bytes of state per parameter plus 8 bytes per block, instead of 8. Smaller
tensors (biases, norms) keep fp32 states, as in bitsandbytes, because their blocks would be
mostly overhead and they cost little memory anyway.

A step decodes both states to fp32, applies the AdamW update there (the parameter moves with the
exact fp32 moments) and quantizes the new moments again. This is what bitsandbytes' CPU kernel
does operation by operation, and ``quantize_8bit`` is bit-exact with its ``quantize_blockwise``,
so the two optimizers agree bit for bit (``tests/test_quant_optim.py``). Plain PyTorch, so the
same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .blockwise import dequantize_8bit, quantize_8bit
from .codes import dynamic_map

BLOCK_SIZE = 256
"""bitsandbytes' blockwise optimizers use blocks of 256 values (fixed in ``Optimizer2State``)."""
MIN_8BIT_SIZE = 4096
"""bitsandbytes' default: tensors with fewer values keep fp32 states."""


def adamw_update(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One decoupled-weight-decay Adam update of fp32 ``param``, ``m`` and ``v`` in place.

    The order of operations is bitsandbytes' (``_optimizer_update_8bit_blockwise_cpu``) so that
    the result is bit-identical to it.
    """
    beta1, beta2 = betas
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    correction1 = 1.0 - beta1 ** step
    correction2 = math.sqrt(1.0 - beta2 ** step)
    denom = (v.sqrt() / correction2).add_(eps)
    if weight_decay > 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.addcdiv_(m, denom, value=-lr / correction1)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8 bits per value, blockwise (see the module docstring).

    State per parameter: ``step`` (fp32 scalar tensor), ``exp_avg`` / ``exp_avg_sq`` (uint8 codes,
    the parameter's shape) with ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (fp32, one per block);
    or, below ``min_8bit_size`` values, fp32 ``exp_avg`` / ``exp_avg_sq``. Every entry is a tensor,
    so ``state_dict()`` loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if not (lr >= 0.0 and eps >= 0.0 and weight_decay >= 0.0):
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if block_size < 1 or min_8bit_size < 0:
            raise ValueError(f"block_size must be >= 1 and min_8bit_size >= 0, got {block_size}, {min_8bit_size}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "block_size": block_size, "min_8bit_size": min_8bit_size}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                self._update(param, group)
        return loss

    def _update(self, param: Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state.update(initial_state(param, group["block_size"], group["min_8bit_size"]))
        state["step"] += 1
        grad = param.grad.float()  # type: ignore[union-attr]
        # ``.float()`` of an fp32 parameter is the parameter itself, so it is updated in place;
        # lower-precision parameters are updated in fp32 and rounded once
        master = param.float()
        args = (int(state["step"].item()), group["lr"], group["betas"], group["eps"], group["weight_decay"])
        if "exp_avg_absmax" in state:
            update_8bit(master, grad, state, group["block_size"], *args)
        else:
            adamw_update(master, grad, state["exp_avg"], state["exp_avg_sq"], *args)
        if master is not param:
            param.copy_(master)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep each state tensor's own dtype.

        PyTorch casts every floating-point state to the parameter's dtype, which would turn the
        uint8 codes into floats and round fp32 absmax of a bf16 parameter to bf16.
        """
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in zip(ids, params):
            if index in saved:
                self.state[param] = {key: value.to(device=param.device, copy=True) if isinstance(value, Tensor)
                                     else value for key, value in saved[index].items()}

    def state_bytes(self) -> int:
        """Bytes held by every state tensor (the 8-bit codes, absmax, fp32 states and step counters)."""
        return sum(value.numel() * value.element_size() for state in self.state.values()
                   for value in state.values() if isinstance(value, Tensor))


def initial_state(param: Tensor, block_size: int, min_8bit_size: int) -> dict[str, Tensor]:
    """Zero moments: 8-bit codes with zero absmax (decoding to 0), or fp32 for small tensors."""
    step = torch.zeros((), dtype=torch.float32, device=param.device)
    if param.numel() < min_8bit_size:
        zeros = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
        return {"step": step, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    blocks = -(-param.numel() // block_size)
    codes = torch.zeros_like(param, dtype=torch.uint8, memory_format=torch.contiguous_format)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=param.device)
    return {"step": step, "exp_avg": codes, "exp_avg_absmax": absmax,
            "exp_avg_sq": codes.clone(), "exp_avg_sq_absmax": absmax.clone()}


def update_8bit(param: Tensor, grad: Tensor, state: dict[str, Tensor], block_size: int, step: int, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Decode both moments, update in fp32, and store the new moments as 8-bit codes again."""
    signed, unsigned = dynamic_map(True, param.device), dynamic_map(False, param.device)
    m = dequantize_8bit(state["exp_avg"], state["exp_avg_absmax"], signed, block_size).view(param.shape)
    v = dequantize_8bit(state["exp_avg_sq"], state["exp_avg_sq_absmax"], unsigned, block_size).view(param.shape)
    adamw_update(param, grad, m, v, step, lr, betas, eps, weight_decay)
    for name, moment, code in (("exp_avg", m, signed), ("exp_avg_sq", v, unsigned)):
        codes, absmax = quantize_8bit(moment, block_size, code)
        state[name].copy_(codes)
        state[f"{name}_absmax"].copy_(absmax)
