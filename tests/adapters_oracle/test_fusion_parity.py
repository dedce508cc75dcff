"""FusionBlock and ``fuse_at_site`` against AdapterHub's AdapterFusion (``Fuse``), site by site."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from adapters.composition import Fuse
from oracle_models import ATOL, block_from, build, fusion_from, hidden_size, inputs, perturb, probe_sites

from deltatune.methods.bottleneck_block import FusionBlock, fuse_at_site

CUSTOM = {"key": True, "query": True, "value": True, "query_before_ln": True, "regularization": False,
          "residual_before": True, "temperature": True, "value_before_softmax": False, "value_initialized": False,
          "dropout_prob": 0.0}
NO_PROJECTIONS = {**CUSTOM, "key": False, "query": False, "value": False, "query_before_ln": False,
                  "residual_before": False, "temperature": False}

MEMBERS: dict[str, list[Any]] = {
    "pfeiffer": [SeqBnConfig(reduction_factor=4), SeqBnConfig(reduction_factor=8, non_linearity="gelu",
                                                              scaling="learned", ln_after=True)],
    "houlsby3": [DoubleSeqBnConfig(reduction_factor=4), DoubleSeqBnConfig(reduction_factor=2),
                 DoubleSeqBnConfig(reduction_factor=8, original_ln_before=True, residual_before_ln=False)],
    "parallel": [ParBnConfig(reduction_factor=4), ParBnConfig(reduction_factor=8, scaling=2.0)],
}

CASES = ([(arch, "dynamic", "pfeiffer") for arch in ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "t5")]
         + [(arch, fusion, members) for arch in ("bert", "llama")
            for fusion, members in (("static", "houlsby3"), ("custom", "pfeiffer"), ("custom", "houlsby3"),
                                    ("dynamic", "parallel"), ("no_projections", "pfeiffer"))])


@pytest.mark.parametrize(("arch", "fusion_name", "members_name"), CASES)
def test_fusion_parity(arch: str, fusion_name: str, members_name: str) -> None:
    model = build(arch)
    names = [f"m{i}" for i in range(len(MEMBERS[members_name]))]
    for name, config in zip(names, MEMBERS[members_name]):
        model.add_adapter(name, config=config)
    fusion_config = {"custom": CUSTOM, "no_projections": NO_PROJECTIONS}.get(fusion_name, fusion_name)
    model.add_adapter_fusion(Fuse(*names), config=fusion_config)
    model.set_active_adapters(Fuse(*names))
    perturb(model)
    fusion_key = ",".join(names)
    resolved, _ = model.adapters_config.get_fusion(fusion_key)
    probe = probe_sites(model, arch)
    ours: dict[int, FusionBlock] = {}
    for i, record in enumerate(probe.records):  # copied before the forward: T changes on every call
        if fusion_key in record.adapter_layer.adapter_fusion_layer:
            ours[i] = fusion_from(record.adapter_layer.adapter_fusion_layer[fusion_key], resolved, hidden_size(model))
    with torch.no_grad():
        model(**inputs(arch))
    probe.close()
    assert ours
    for i, fusion in ours.items():
        record, t = probe.records[i], probe.records[i].tensors
        blocks = [block_from(record.adapter_layer.adapters[name], model.adapters_config.get(name), record.layer_idx,
                             hidden_size(model)) for name in names]
        with torch.no_grad():
            expected = fuse_at_site(blocks, fusion, t["hidden"], t["residual"], record.layer_norm)
        torch.testing.assert_close(expected, t["result"], atol=ATOL, rtol=0,
                                   msg=lambda m, r=record: f"layer {r.layer_idx} {r.spec.location}: {m}")
        assert fusion.T == record.adapter_layer.adapter_fusion_layer[fusion_key].T  # the same temperature schedule


def test_fusion_init_matches_adapterhub() -> None:
    """Value starts as the identity plus 1e-6 off the diagonal; query and key N(0, 0.02) with zero bias; T = 50
    with temperature, lowered by T/1000 per call down to 1."""
    from adapters import DynamicAdapterFusionConfig
    from adapters.methods.modeling import BertFusion

    theirs = BertFusion(DynamicAdapterFusionConfig(temperature=True), 64, 0.0)
    ours = FusionBlock(64, temperature=True)
    torch.testing.assert_close(ours.value.weight, theirs.value.weight, atol=0, rtol=0)  # type: ignore[union-attr]
    for name in ("query", "key"):
        mine, other = getattr(ours, name), getattr(theirs, name)
        assert torch.count_nonzero(mine.bias) == torch.count_nonzero(other.bias) == 0
        assert abs(float(mine.weight.detach().std()) - 0.02) < 2e-3 and abs(float(other.weight.detach().std()) - 0.02) < 2e-3
    assert ours.T == theirs.T == 50.0 and ours.reduction == theirs.reduction
    query, ups = torch.randn(1, 3, 64), torch.randn(1, 3, 2, 64)
    for _ in range(1200):
        ours(query, ups, query), theirs(query, ups.clone(), ups.clone(), query)
    assert ours.T == theirs.T == 1.0
