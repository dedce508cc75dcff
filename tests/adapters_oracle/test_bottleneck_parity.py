"""BottleneckBlock and the site functions against AdapterHub's ``adapters`` 1.3, site by site.

Each test adds one adapter with non-default fields to a tiny random model, perturbs its weights,
records every site's inputs and result with forward hooks during one forward pass, copies each site's
adapter into a BottleneckBlock and checks that ``apply_at_site`` gives AdapterHub's result (fp32,
max abs diff <= 1e-5). Sites without an adapter (``leave_out``, a location the config leaves off)
must give the model's own residual sum (and layer norm).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from adapters import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from oracle_models import ATOL, adapter_sites, block_from, build, hidden_size, inputs, perturb, probe_sites

from deltatune.methods.bottleneck_block import apply_at_site

POST_LN = ("bert", "roberta", "distilbert")
PRE_LN = ("gpt2", "llama", "mistral", "qwen2", "t5")

CONFIGS: dict[str, Callable[[], BnConfig]] = {
    "houlsby": lambda: DoubleSeqBnConfig(reduction_factor=4, cross_adapter=True),
    "pfeiffer_ln": lambda: SeqBnConfig(reduction_factor={"0": 2, "default": 8}, non_linearity="gelu",
                                       scaling="learned", ln_before=True, ln_after=True),
    "residual_after_ln": lambda: DoubleSeqBnConfig(residual_before_ln=False, original_ln_before=True, scaling=0.5,
                                                   non_linearity="tanh", init_weights="houlsby"),
    "post_add": lambda: SeqBnConfig(residual_before_ln="post_add", mh_adapter=True, non_linearity="silu"),
    "no_original_ln_after": lambda: BnConfig(
        mh_adapter=True, output_adapter=True, reduction_factor=8, non_linearity="leakyrelu", original_ln_before=True,
        original_ln_after=False, residual_before_ln=False, adapter_residual_before_ln=True, ln_after=True,
        use_gating=True, scaling="channel", leave_out=[1]),
    "parallel": lambda: ParBnConfig(),
    "parallel_both": lambda: ParBnConfig(mh_adapter=True, reduction_factor=8, ln_before=True, ln_after=True,
                                         scaling="learned", non_linearity="gelu_new", init_weights="bert"),
}
"""Every config field the block implements, away from its default somewhere."""

CASES = [(arch, name) for arch in POST_LN + PRE_LN for name in CONFIGS
         if not (name == "post_add" and arch in PRE_LN)  # AdapterHub fails there: no layer norm at the site
         and not (name == "no_original_ln_after" and arch == "qwen2")]  # refused for hook-based models


def check_sites(arch: str, config: BnConfig) -> int:
    """Run one forward with adapter "a" and compare every site; returns how many sites had an adapter."""
    model = build(arch)
    model.add_adapter("a", config=config)
    model.set_active_adapters("a")
    perturb(model)
    probe = probe_sites(model, arch)
    with torch.no_grad():
        model(**inputs(arch))
    probe.close()
    resolved = model.adapters_config.get("a")
    checked = 0
    for record, adapter in adapter_sites(probe, "a"):
        t = record.tensors
        assert set(t) == {"hidden", "residual", "result"}, (record.layer_idx, record.spec.location, sorted(t))
        if adapter is None:
            expected = t["hidden"] + t["residual"]
            expected = expected if record.layer_norm is None else record.layer_norm(expected)
        else:
            block = block_from(adapter, resolved, record.layer_idx, hidden_size(model))
            with torch.no_grad():
                expected = apply_at_site(block, t["hidden"], t["residual"], record.layer_norm)
            checked += 1
        torch.testing.assert_close(expected, t["result"], atol=ATOL, rtol=0,
                                   msg=lambda m, r=record: f"layer {r.layer_idx} {r.spec.location}: {m}")
    wanted = sum(1 for r in probe.records
                 if resolved.get(r.spec.location, False) and r.layer_idx not in resolved["leave_out"])
    assert checked == wanted > 0
    return checked


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_site_parity(arch: str, name: str) -> None:
    check_sites(arch, CONFIGS[name]())


def test_every_site_kind_is_reached() -> None:
    """T5's cross-attention sites (decoder only) and both sites of every layer of a Houlsby adapter."""
    assert check_sites("t5", CONFIGS["houlsby"]()) == 2 * 2 + 3 * 2
    assert check_sites("bert", CONFIGS["houlsby"]()) == 2 * 2
