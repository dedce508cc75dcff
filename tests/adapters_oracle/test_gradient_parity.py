"""Training-mode parity: with gradients on, deltatune's outputs and gradients against AdapterHub's ``adapters`` 1.3.

The other parity tests run under ``torch.no_grad``; a single Pfeiffer-placed adapter at a post-LN site
(BERT, RoBERTa, DistilBERT) then takes deltatune's general path, but in training it runs as one fused
autograd Function (methods/bottleneck_fused.py) with its own backward. Here both libraries' models run
forward with gradients and backward from the same weighted sum of their outputs; the outputs must
agree to 1e-5 and the adapters' (and the input embeddings') gradients to rounding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from oracle_models import ATOL, inputs
from test_model_parity import ARCHS, ConfigPair, SINGLE, _pair, pair_models
from torch import Tensor, nn

import adapters
import deltatune as dt
import deltatune.methods.bottleneck_compose as compose
from deltatune.methods.bottleneck_block import BottleneckBlock

POST_LN = ("bert", "roberta", "distilbert")
CONFIGS: dict[str, ConfigPair] = {
    "pfeiffer": SINGLE["pfeiffer"],
    "pfeiffer_mh_scaled": _pair(adapters.SeqBnConfig, dt.SeqBnConfig, reduction_factor=4, mh_adapter=True, scaling=0.5),
    "houlsby": SINGLE["houlsby"],
}


def run(model: nn.Module, arch: str) -> Tensor:
    result = model(**inputs(arch, batch=3))
    out = result.logits if hasattr(result, "logits") else result.last_hidden_state
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    (out * weights).sum().backward()
    return out.detach()


def assert_near(got: Tensor | None, expected: Tensor | None, what: str) -> None:
    """Equal up to fp32 rounding: 1e-5 of the gradient's largest entry (sums run in other orders on the two sides)."""
    assert got is not None and expected is not None, what
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()), msg=what)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_training_outputs_and_gradients(arch: str, config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs, ours = pair_models(arch, {"a": CONFIGS[config]})
    theirs.train_adapter("a")
    theirs.eval()  # train_adapter switches to train mode: no dropout on either side
    dt.set_active(ours, "a")
    for model in (theirs, ours):
        model.get_input_embeddings().weight.requires_grad_(True)  # gradients through every site's h and x
    fused: list[Any] = []
    original = compose.fused_site
    monkeypatch.setattr(compose, "fused_site", lambda *args: fused.append(original(*args)) or fused[-1])
    torch.testing.assert_close(run(ours, arch), run(theirs, arch), atol=ATOL, rtol=0)
    expect_fused = arch in POST_LN and config.startswith("pfeiffer")
    ran = {r is not None for r in fused}  # pre-LN sites never ask; other blocks are asked and decline
    assert ran <= {expect_fused} and (bool(ran) or not expect_fused)
    their_params = dict(theirs.named_parameters())
    compared = 0
    for path, block in ours.named_modules():
        if isinstance(block, BottleneckBlock):
            site, _, name = path.rsplit(".", 2)
            for key, param in block.named_parameters():
                theirs_grad = their_params[f"{site}.adapters.{name}.{block.adapterhub_keys()[key][0]}"].grad
                assert_near(param.grad, theirs_grad, f"{path}.{key}")
                compared += 1
    assert compared
    assert_near(ours.get_input_embeddings().weight.grad, theirs.get_input_embeddings().weight.grad, "embeddings")
