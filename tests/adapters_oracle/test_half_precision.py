"""Bottleneck adapters and fusions over a bf16 base, both ways with AdapterHub's ``adapters`` 1.3.

deltatune keeps them in fp32 over a half-precision base (``layer.adapter_dtype``, the rule of every other
method); AdapterHub keeps them in whatever dtype the modules were given (``model.to`` after ``add_adapter``).
A folder AdapterHub writes from a bf16 model holds bf16 tensors: deltatune loads them into fp32 parameters
exactly and writes the same values back in fp32 (peft's convention for fp32 adapters), which AdapterHub loads
exactly (into fp32 modules: AdapterHub creates new modules in fp32 whatever the model's dtype).
"""

from __future__ import annotations

from pathlib import Path

import adapters
import pytest
import torch
from adapters.composition import Fuse
from oracle_models import build, perturb
from safetensors.torch import load_file

import deltatune as dt

CONFIGS = {"houlsby": adapters.DoubleSeqBnConfig, "pfeiffer": adapters.SeqBnConfig, "parallel": adapters.ParBnConfig}


def test_adapterhub_gives_an_adapter_added_to_a_bf16_model_fp32_modules_it_cannot_run() -> None:
    """Why deltatune does not copy AdapterHub here: AdapterHub has no rule (new modules are fp32, the forward
    then fails), and ``model.to(torch.bfloat16)`` after ``add_adapter`` trains them in bf16."""
    from oracle_models import inputs

    theirs = build("bert").to(torch.bfloat16)
    theirs.add_adapter("a", config=adapters.SeqBnConfig())
    theirs.set_active_adapters("a")
    assert {p.dtype for n, p in theirs.named_parameters() if ".adapters." in n} == {torch.float32}
    with pytest.raises(RuntimeError, match="same dtype"):
        theirs(**inputs("bert"))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_bf16_folders_round_trip_exactly_through_fp32_parameters(tmp_path: Path, arch: str, config: str) -> None:
    theirs = build(arch)
    theirs.add_adapter("a", config=CONFIGS[config]())
    perturb(theirs)
    theirs.to(torch.bfloat16)
    theirs.save_adapter(str(tmp_path / "theirs"), "a", use_safetensors=True)
    written = load_file(tmp_path / "theirs" / "adapter.safetensors")
    assert written and {t.dtype for t in written.values()} == {torch.bfloat16}
    ours = dt.load(build(arch, init_adapters=False).to(torch.bfloat16), tmp_path / "theirs", name="a")
    assert {p.dtype for n, p in ours.named_parameters() if "site_adapters" in n} == {torch.float32}
    dt.save(ours, tmp_path / "ours", format="adapters")
    again = load_file(tmp_path / "ours" / "adapter.safetensors")
    assert sorted(again) == sorted(written)
    assert all(again[k].dtype == torch.float32 and torch.equal(again[k], written[k].float()) for k in written)
    back = build(arch).to(torch.bfloat16)
    info: dict[str, list[str]] = {}
    assert back.load_adapter(str(tmp_path / "ours"), use_safetensors=True, loading_info=info) == "a"
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    mine, original = ({k: v for k, v in m.state_dict().items() if ".adapters." in k} for m in (back, theirs))
    assert sorted(mine) == sorted(original)  # AdapterHub's new modules are fp32 whatever the model's dtype
    assert all(mine[k].dtype == torch.float32 and torch.equal(mine[k], original[k].float()) for k in original)


def test_a_bf16_fusion_round_trips_exactly_through_fp32_parameters(tmp_path: Path) -> None:
    theirs = build("bert")
    for name in ("a", "b"):
        theirs.add_adapter(name, config=adapters.SeqBnConfig())
    theirs.add_adapter_fusion(Fuse("a", "b"))
    perturb(theirs)
    theirs.to(torch.bfloat16)
    (tmp_path / "theirs").mkdir()
    for name in ("a", "b"):
        theirs.save_adapter(str(tmp_path / "theirs" / name), name, use_safetensors=True)
    theirs.save_adapter_fusion(str(tmp_path / "theirs" / "ab"), "a,b", use_safetensors=True)
    ours = build("bert", init_adapters=False).to(torch.bfloat16)
    for name in ("a", "b", "ab"):
        dt.load(ours, tmp_path / "theirs" / name, name=name)
    assert {p.dtype for n, p in ours.named_parameters() if "site_adapters" in n} == {torch.float32}
    dt.save(ours, tmp_path / "ours", names=["a", "b", "ab"], format="adapters")
    written = load_file(tmp_path / "theirs" / "ab" / "model_adapter_fusion.safetensors")
    again = load_file(tmp_path / "ours" / "ab" / "model_adapter_fusion.safetensors")
    assert written and sorted(again) == sorted(written)
    assert all(again[k].dtype == torch.float32 and torch.equal(again[k], written[k].float()) for k in written)
    back = build("bert").to(torch.bfloat16)
    for name in ("a", "b"):
        back.load_adapter(str(tmp_path / "ours" / name), use_safetensors=True)
    back.load_adapter_fusion(str(tmp_path / "ours" / "ab"), use_safetensors=True)
    mine, original = ({k: v for k, v in m.state_dict().items() if ".adapters." in k or "adapter_fusion_layer" in k}
                      for m in (back, theirs))
    assert sorted(mine) == sorted(original)  # AdapterHub's new modules are fp32 whatever the model's dtype
    assert all(mine[k].dtype == torch.float32 and torch.equal(mine[k], original[k].float()) for k in original)
