"""Lower bounds of a LoRA training step on this machine: its matrix products, timed alone.

Two child variants (child.py) run these steps in the same rounds as the real variants, so the
report can say how far below each time target the physics of this CPU allows:

bound-matmuls     every matrix product a LoRA step needs and nothing else. Per frozen linear
                  layer (the LM head included) x·Wᵀ and, where anything upstream trains, the
                  input gradient g·W; per adapted layer the six low-rank products x·Aᵀ, h·Bᵀ,
                  gᵀ·h, g·B, dhᵀ·x, dh·A; then AdamW on the adapter. Outputs are preallocated
                  and inputs reused: no allocation, no page fault, no attention, no norm, no
                  activation, no loss. No fp32 step with this GEMM library can be faster.
bound-floor-lora  the floor's own step (stock forward + backward to the inputs), then only the
                  six low-rank products per layer and AdamW: the best the LoRA path can do
                  without making the frozen base itself cheaper. In inference mode: the base
                  model's forward, then the two forward low-rank products per layer.

The adapted layers are those LoRA targets in the benchmark ("all-linear": every nn.Linear and
GPT-2 Conv1D but the output head). Which ones need no input gradient (they read the frozen
embeddings) is read off the module names of the suite's three models. MiniLM's pooler acts on
one token per sequence and is left out: leaving work out keeps a lower bound a lower bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BOUND_VARIANTS = ("bound-matmuls", "bound-floor-lora")
HEADS = frozenset({"lm_head", "classifier"})  # output layers: frozen, never adapted
# The first block's projections of the (frozen) embeddings: nothing upstream trains, so a LoRA
# step never needs the gradient of their input (LLaMA, GPT-2, MiniLM names).
NO_INPUT_GRAD = frozenset({*(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"),
                           "transformer.h.0.attn.c_attn",
                           *(f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value"))})

Product = Callable[[], Any]


def bound_step(variant: str, model: Any, floor_step: Callable[[], Any], tokens: int,
               rank: int, training: bool = True) -> Callable[[], None]:
    """The step of a bound variant on ``model`` (a frozen benchmark model); ``floor_step`` runs
    the floor's (or, not ``training``, the base's) step (used by bound-floor-lora). Not
    training: forward products only, no AdamW (bound-floor-lora of an inference forward)."""
    import torch

    if variant not in BOUND_VARIANTS:
        raise ValueError(f"unknown bound variant {variant!r}; choose from {BOUND_VARIANTS}")
    with_base = variant == "bound-matmuls"
    if with_base and not training:
        raise ValueError("bound-matmuls is a training step; use bound-floor-lora for inference")
    buffers = Buffers(tokens)
    products: list[Product] = []
    params: list[torch.nn.Parameter] = []
    for name, weight in dense_layers(model):
        input_grad = name not in NO_INPUT_GRAD
        if with_base:
            products += base_products(buffers, weight, input_grad)
        if is_adapted(name):
            out_dim, in_dim = weight.shape
            lora, adapter = lora_products(buffers, out_dim, in_dim, rank, input_grad, training)
            products += lora
            params += adapter
    optimizer = torch.optim.AdamW(params, lr=1e-4) if training else None

    def step() -> None:
        if not with_base:
            floor_step()
        for product in products:
            product()
        if optimizer is not None:
            optimizer.step()

    return step


def is_adapted(name: str) -> bool:
    """Whether the benchmark's "all-linear" LoRA adapts this dense layer (the pooler: see above)."""
    return name.split(".")[-1] not in HEADS and "pooler" not in name


def dense_layers(model: Any) -> list[tuple[str, Any]]:
    """(name, weight as (out, in)) of every nn.Linear and transformers Conv1D (stored (in, out))."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found.append((name, module.weight.detach()))
        elif type(module).__name__ == "Conv1D":
            found.append((name, module.weight.detach().t()))
    return found


class Buffers:
    """Preallocated activations, one set per shape (an optimistic bound: no allocation)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self._made: dict[tuple[str, int], Any] = {}

    def get(self, role: str, width: int) -> Any:
        """A random (tokens, width) fp32 matrix, the same one for the same role and width."""
        import torch

        key = (role, width)
        if key not in self._made:
            self._made[key] = torch.randn(self.tokens, width)
        return self._made[key]


def base_products(buf: Buffers, weight: Any, input_grad: bool) -> list[Product]:
    """The frozen layer's forward x·Wᵀ and, if needed, its input gradient g·W."""
    import torch

    out_dim, in_dim = weight.shape
    x, y = buf.get("x", in_dim), buf.get("y", out_dim)
    g, dx = buf.get("g", out_dim), buf.get("dx", in_dim)
    wt = weight.t()
    found: list[Product] = [lambda: torch.mm(x, wt, out=y)]
    if input_grad:
        found.append(lambda: torch.mm(g, weight, out=dx))
    return found


def lora_products(buf: Buffers, out_dim: int, in_dim: int, rank: int, input_grad: bool,
                  backward: bool = True) -> tuple[list[Product], list[Any]]:
    """The six low-rank products of one adapted layer (five without the input gradient; the
    two forward ones without ``backward``), and the adapter's A and B with their gradients
    preallocated."""
    import torch

    scale = 2.0  # alpha = 2r, as in the benchmark; dA and dB leave it out (timing is the same)
    a = torch.nn.Parameter(torch.randn(rank, in_dim) * 0.01)
    b = torch.nn.Parameter(torch.randn(out_dim, rank) * 0.01)
    a.grad, b.grad = torch.empty_like(a), torch.empty_like(b)
    x, y = buf.get("x", in_dim), buf.get("y", out_dim)
    g, dx = buf.get("g", out_dim), buf.get("dx", in_dim)
    h, dh = buf.get("h", rank), buf.get("dh", rank)
    at, bt, gt, ht, dht = a.detach().t(), b.detach().t(), g.t(), h.t(), dh.t()
    found: list[Product] = [
        lambda: torch.mm(x, at, out=h),
        lambda: y.addmm_(h, bt, alpha=scale),
    ]
    if backward:
        found += [
            lambda: torch.mm(gt, h, out=b.grad),
            lambda: torch.mm(g, b.detach(), out=dh),
            lambda: torch.mm(dht, x, out=a.grad),
        ]
    if backward and input_grad:
        found.append(lambda: dx.addmm_(dh, a.detach(), alpha=scale))
    return found, [a, b]
