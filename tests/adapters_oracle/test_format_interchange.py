"""AdapterHub folders both ways: what ``adapters`` 1.3's ``save_adapter`` writes, ``dt.load`` reads; what
``dt.save(..., format="adapters")`` writes, AdapterHub's ``load_adapter`` reads; the outputs agree at max abs
diff <= 1e-5 (fp32, rtol=0) on the eight architectures of ``oracle_models``.

Both sides start from the same seeded tiny model (``build``); AdapterHub's adapter weights are randomised
(``perturb``) or deltatune's (``randomize``), so no block sits at its identity init, and each check first
asserts that the adapter changes the output.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import adapters
import pytest
import torch
from oracle_models import ATOL, build, inputs, perturb
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt

ARCHS = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "t5")
CUSTOM = dict(mh_adapter=True, output_adapter=True, cross_adapter=True, reduction_factor={"0": 2, "3": 4, "default": 8},
              non_linearity="gelu", original_ln_before=True, residual_before_ln=False, ln_after=True,
              scaling="channel", use_gating=True, leave_out=[1])
"""Non-default fields: per-layer reduction factors, gelu, the adapter's output norm, a per-channel scaling, a gate,
leave_out, T5's cross-attention site."""
THEIRS: dict[str, Callable[[], Any]] = {
    "houlsby": adapters.DoubleSeqBnConfig,
    "pfeiffer": adapters.SeqBnConfig,
    "parallel": lambda: adapters.ParBnConfig(mh_adapter=True, scaling="learned"),
    "custom": lambda: adapters.BnConfig(**CUSTOM),
    "ln_before": lambda: adapters.SeqBnConfig(ln_before=True, mh_adapter=True, adapter_residual_before_ln=True,
                                              ln_after=True),
}
"""AdapterHub itself cannot save "ln_before" with safetensors (its norm sits under two keys that share memory)."""
OURS: dict[str, Callable[[], dt.BnConfig]] = {
    "houlsby": dt.DoubleSeqBnConfig,
    "pfeiffer": dt.SeqBnConfig,
    "parallel": lambda: dt.ParBnConfig(mh_adapter=True, scaling="learned"),
    "custom": lambda: dt.BnConfig(**{**CUSTOM, "leave_out": (1,)}),  # type: ignore[arg-type]
    "ln_before": lambda: dt.SeqBnConfig(ln_before=True, mh_adapter=True, adapter_residual_before_ln=True, ln_after=True),
}
BATCH = 2


def output(model: nn.Module, arch: str) -> Tensor:
    with torch.no_grad():
        result = model(**inputs(arch, batch=BATCH))
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Seeded noise on every deltatune adapter tensor (up projections included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "site_adapters" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def their_model(arch: str, config: Any) -> tuple[nn.Module, Tensor, Tensor]:
    """An AdapterHub model with adapter "a" (randomised) active, its output, and the base model's output."""
    theirs = build(arch)
    plain = output(theirs, arch)
    theirs.add_adapter("a", config=config)
    theirs.set_active_adapters("a")
    perturb(theirs)
    return theirs, output(theirs, arch), plain


def load_quietly(model: nn.Module, folder: Path, name: str = "a") -> nn.Module:
    """``dt.load`` with warnings as errors: a folder from the same checkpoint loads without any remark."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return dt.load(model, folder, name=name)


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("config", list(THEIRS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folder_saved_by_adapterhub_loads_in_deltatune(tmp_path: Path, arch: str, config: str, safetensors: bool) -> None:
    if safetensors and config == "ln_before":
        pytest.skip("AdapterHub 1.3 cannot write an ln_before adapter as safetensors (test_format.py pins that)")
    theirs, expected, plain = their_model(arch, THEIRS[config]())
    theirs.save_adapter(str(tmp_path), "a", use_safetensors=safetensors)
    ours = load_quietly(build(arch, init_adapters=False), tmp_path)
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(output(ours, arch), expected, atol=ATOL, rtol=0)
    assert dt.active_adapters(ours) == ("a",)
    with dt.disabled(ours):
        torch.testing.assert_close(output(ours, arch), plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", list(OURS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folder_saved_by_deltatune_loads_in_adapterhub(tmp_path: Path, arch: str, config: str) -> None:
    ours = build(arch, init_adapters=False)
    plain = output(ours, arch)
    dt.attach(ours, OURS[config](), name="a")
    randomize(ours)
    expected = output(ours, arch)
    assert (expected - plain).abs().max() > 1e-3
    dt.save(ours, tmp_path, format="adapters")
    theirs = build(arch)
    info: dict[str, list[str]] = {}
    assert theirs.load_adapter(str(tmp_path), use_safetensors=True, loading_info=info) == "a"
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    theirs.set_active_adapters("a")
    torch.testing.assert_close(output(theirs, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", ["houlsby", "pfeiffer", "parallel", "custom"])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_adapter_config_json_equals_adapterhubs(tmp_path: Path, arch: str, config: str) -> None:
    """The same model and config: deltatune writes the same adapter_config.json as AdapterHub, and the same keys."""
    theirs = build(arch)
    theirs.add_adapter("a", config=THEIRS[config]())
    theirs.save_adapter(str(tmp_path / "theirs"), "a", use_safetensors=True)
    ours = build(arch, init_adapters=False)
    dt.attach(ours, OURS[config](), name="a")
    dt.save(ours, tmp_path / "ours", format="adapters")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    mine, their_keys = load_file(tmp_path / "ours" / "adapter.safetensors"), load_file(tmp_path / "theirs" / "adapter.safetensors")
    assert sorted(mine) == sorted(their_keys)
    assert all(mine[k].shape == their_keys[k].shape for k in mine)


def seq_cls(init_adapters: bool, num_labels: int = 3) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                           intermediate_size=64, vocab_size=128, num_labels=num_labels))
    if init_adapters:
        adapters.init(model)
    return model.eval()


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_trained_classifier_head_travels_both_ways(tmp_path: Path, safetensors: bool) -> None:
    """AdapterHub saves a sequence classifier's ``classifier.*`` beside the adapter: deltatune loads it as the
    adapter's own copy of the head (the base head is kept for ``dt.disabled``), and writes it back so that
    AdapterHub loads adapter and head with the same logits."""
    theirs = seq_cls(True)
    plain = output(theirs, "bert")
    theirs.add_adapter("a", config=adapters.SeqBnConfig())
    theirs.set_active_adapters("a")
    perturb(theirs)
    with torch.no_grad():  # a trained head: not the seed's
        theirs.classifier.weight.add_(torch.randn(theirs.classifier.weight.shape, generator=torch.Generator().manual_seed(5)))
    expected = output(theirs, "bert")
    theirs.save_adapter(str(tmp_path / "theirs"), "a", use_safetensors=safetensors)
    ours = load_quietly(seq_cls(False), tmp_path / "theirs")
    torch.testing.assert_close(output(ours, "bert"), expected, atol=ATOL, rtol=0)
    with dt.disabled(ours):
        torch.testing.assert_close(output(ours, "bert"), plain, atol=ATOL, rtol=0)
    dt.save(ours, tmp_path / "ours", format="adapters")
    back = seq_cls(True)
    back.load_adapter(str(tmp_path / "ours"), use_safetensors=True)
    back.set_active_adapters("a")
    torch.testing.assert_close(output(back, "bert"), expected, atol=ATOL, rtol=0)
    with pytest.raises(dt.AdapterFileError, match="num_labels"):  # the same class with another head: refused
        dt.load(seq_cls(False, num_labels=2), tmp_path / "theirs", name="a")


def test_keys_with_the_base_model_prefix_load_into_the_bare_model(tmp_path: Path) -> None:
    """A folder saved from BertForSequenceClassification (keys ``bert.encoder...``) loads into a bare BertModel, as
    in AdapterHub; its classifier head cannot go anywhere there, which a warning says."""
    import transformers as tf

    theirs = seq_cls(True)
    theirs.add_adapter("a", config=adapters.DoubleSeqBnConfig())
    theirs.set_active_adapters("a")
    perturb(theirs)
    theirs.save_adapter(str(tmp_path), "a", use_safetensors=True)
    assert all(k.startswith("bert.") for k in load_file(tmp_path / "adapter.safetensors"))
    with torch.no_grad():
        expected = theirs.bert(**inputs("bert")).last_hidden_state
    bare = tf.BertModel(theirs.config, add_pooling_layer=True).eval()
    assert bare.load_state_dict(theirs.bert.state_dict(), strict=False).missing_keys == []  # the same base weights
    with pytest.warns(UserWarning, match=r"\['classifier.bias', 'classifier.weight'\].*BertModel"):
        dt.load(bare, tmp_path, name="a")
    torch.testing.assert_close(output(bare, "bert"), expected, atol=ATOL, rtol=0)
