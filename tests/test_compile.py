"""torch.compile on the fused single-adapter path: one graph, the eager loss and gradients.

Slow (about 15-20 s of compilation per case on 2 cores): run with ``pytest -m slow``."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import deltatune as dt


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True])
def test_adapted_llama_compiles_without_graph_breaks(use_dora: bool) -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                   use_dora=use_dora))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    eager_loss = model(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    counters.clear()
    torch._dynamo.reset()
    loss = torch.compile(model)(input_ids=ids, labels=ids).loss
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
