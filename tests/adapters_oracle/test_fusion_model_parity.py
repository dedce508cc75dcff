"""Whole-model AdapterFusion: deltatune's dt.FusionConfig + dt.Fuse against AdapterHub's
add_adapter_fusion + Fuse, on the same base, members and fusion weights (max abs diff <= 1e-5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from adapters.composition import Fuse
from oracle_models import ATOL
from test_model_parity import ARCHS, MEMBERS, output, pair_models
from torch import nn

import deltatune as dt
from deltatune.methods.bottleneck_block import FusionBlock
from deltatune.sites import HOLDER

FUSIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "dynamic": ("dynamic", {}),
    "static": ("static", {"value": False, "regularization": False, "value_initialized": False}),
    "custom": ({"key": True, "query": True, "value": True, "query_before_ln": True, "regularization": False,
                "residual_before": True, "temperature": True, "value_before_softmax": False,
                "value_initialized": False, "dropout_prob": 0.0},
               {"query_before_ln": True, "regularization": False, "residual_before": True, "temperature": True,
                "value_before_softmax": False, "value_initialized": False, "dropout_prob": 0.0}),
}


def copy_fusion(theirs: nn.Module, ours: nn.Module, fusion_key: str, name: str) -> None:
    """AdapterHub's fusion weights into deltatune's fusion blocks; every key on each side used once."""
    their_state = {k: v for k, v in theirs.state_dict().items() if f".adapter_fusion_layer.{fusion_key}." in k}
    consumed, filled = set(), 0
    for path, block in ours.named_modules():
        if not isinstance(block, FusionBlock):
            continue
        site, holder, block_name = path.rsplit(".", 2)
        assert holder == HOLDER and block_name == name, path
        new = {k: their_state[f"{site}.adapter_fusion_layer.{fusion_key}.{k}"] for k in block.state_dict()}
        consumed.update(f"{site}.adapter_fusion_layer.{fusion_key}.{k}" for k in new)
        block.load_state_dict(new, strict=True)
        filled += 1
    assert filled and consumed == set(their_state), sorted(set(their_state) - consumed)


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("arch", [a for a in ARCHS if a in ("bert", "roberta", "distilbert", "gpt2", "llama", "t5")])
def test_fused_model_outputs_equal_adapterhubs(arch: str, fusion: str) -> None:
    theirs, ours = pair_models(arch, dict(zip("ab", MEMBERS["pfeiffer"])))
    their_config, our_fields = FUSIONS[fusion]
    theirs.add_adapter_fusion(Fuse("a", "b"), config=their_config)
    dropout = {} if "dropout_prob" in our_fields else {"dropout_prob": None}
    dt.attach(ours, dt.FusionConfig(adapter_names=["a", "b"], **{**dropout, **our_fields}), name="ab")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # random fusion weights (the members were randomised and copied by pair_models)
        for key, param in sorted(theirs.named_parameters()):
            if ".adapter_fusion_layer." in key:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    copy_fusion(theirs, ours, "a,b", "ab")
    theirs.set_active_adapters(Fuse("a", "b"))
    dt.set_active(ours, dt.Fuse("a", "b"))
    theirs.eval(), ours.eval()
    with dt.disabled(ours):
        plain = output(ours, arch)
    expected, got = output(theirs, arch), output(ours, arch)
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
