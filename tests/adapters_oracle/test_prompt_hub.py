"""AdapterHub's prefix-tuning and prompt-tuning folders both ways, against ``adapters`` 1.3 itself.

A folder ``save_adapter`` writes (its default ``.bin``, the prefix pool stored once per layer) loads with ``dt.load``
and gives AdapterHub's logits, and a folder ``dt.save(..., format="adapters")`` writes loads with ``load_adapter``
and gives deltatune's, at max abs diff <= 1e-5 (fp32, rtol 0): prefix tuning (flat and with its MLP, frozen and
trainable) on BERT sequence classification, GPT-2 and LLaMA (grouped-query attention); prompt tuning
(``combine="prefix"`` and ``"prefix_after_bos"``) on BERT, the only one of the three AdapterHub gives prompt
tuning. Inputs carry a padded row. AdapterHub's side runs eager attention: its sdpa path masks its own prefix out
(a boolean mask inverted as if additive) or, without a mask, aligns the causal mask to the prefix; that and its
sdpa prompt rows attending padding are pinned as strict xfails. deltatune's side runs both (in transformers 4.57
BERT's sdpa mask cannot take inserted prompt tokens with padding: that case runs without padding).
Then the written configs equal AdapterHub's, and AdapterHub folders deltatune cannot reproduce are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import adapters
import pytest
import torch
from oracle_models import ATOL, _quiet
from prompt_inputs import inputs
from torch import Tensor, nn

import deltatune as dt

N = 3
ARCHS = ("bert", "gpt2", "llama")


def build(arch: str, attn: str = "eager", hub: bool = False) -> nn.Module:
    """A tiny seeded model (the same weights for the same arch), AdapterHub-enabled with ``hub``."""
    import transformers as tf

    _quiet()
    torch.manual_seed(0)
    small: dict[str, Any] = dict(vocab_size=128, max_position_embeddings=64, attn_implementation=attn)
    if arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                               intermediate_size=64, num_labels=3, initializer_range=0.2,
                                                               **small))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                                                 attn_implementation=attn))
    elif arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=64, **small))
    else:
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                                          vocab_size=128, decoder_start_token_id=0))
    if hub:
        adapters.init(model)
    return model.eval()


def logits(model: nn.Module, pad: bool = True) -> Tensor:
    with torch.no_grad():
        return model(**inputs(pad)).logits


def noise(model: nn.Module, part: str, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if part in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


def theirs_with(arch: str, config: Any, folder: Path, attn: str = "eager") -> tuple[nn.Module, Tensor]:
    """An AdapterHub model with adapter "a" (randomised, active), saved to ``folder``; its logits."""
    theirs = build(arch, attn, hub=True)
    plain = logits(theirs)
    theirs.add_adapter("a", config=config)
    theirs.set_active_adapters("a")
    noise(theirs, "prefix_tunings" if isinstance(config, adapters.PrefixTuningConfig) else "prompt_tunings")
    theirs.save_adapter(str(folder), "a")
    result = logits(theirs)
    assert not torch.allclose(result, plain, atol=1e-3)  # the adapter changes the output
    return theirs, result


def close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- AdapterHub -> deltatune


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "mlp"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_adapterhub_prefix_loads(arch: str, flat: bool, trainable: bool, attn: str, tmp_path: Path) -> None:
    config = adapters.PrefixTuningConfig(prefix_length=N, flat=flat, bottleneck_size=8)
    _, expected = theirs_with(arch, config, tmp_path / "a")
    assert (tmp_path / "a" / "pytorch_adapter.bin").is_file()  # AdapterHub cannot write a prefix pool as safetensors
    ours = build(arch, attn)
    if arch == "llama" and trainable and not flat:
        with pytest.raises(dt.AdapterFileError, match="grouped-query attention.*load it frozen"):
            dt.load(ours, tmp_path / "a", name="a", trainable=True)
        return
    dt.load(ours, tmp_path / "a", name="a", trainable=trainable)
    close(logits(ours.eval()), expected)


@pytest.mark.parametrize("combine", ["prefix", "prefix_after_bos"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("attn, pad", [("eager", True), ("sdpa", False)])
def test_adapterhub_prompt_loads(combine: str, trainable: bool, attn: str, pad: bool, tmp_path: Path) -> None:
    theirs, _ = theirs_with("bert", adapters.PromptTuningConfig(prompt_length=N, combine=combine), tmp_path / "a")
    ours = build("bert", attn)
    dt.load(ours, tmp_path / "a", name="a", trainable=trainable)
    close(logits(ours.eval(), pad), logits(theirs, pad))


# --------------------------------------------------------------------------- deltatune -> AdapterHub


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_deltatune_prefix_loads_in_adapterhub(arch: str, projection: bool, attn: str, tmp_path: Path) -> None:
    ours = build(arch, attn)
    dt.attach(ours, dt.PrefixTuningConfig(num_virtual_tokens=N, token_positions="from_zero",
                                          prefix_projection=projection, encoder_hidden_size=8), "a")
    noise(ours, "site_adapters")
    expected = logits(ours.eval())
    dt.save(ours, tmp_path / "a", format="adapters")
    theirs = build(arch, hub=True)
    theirs.load_adapter(str(tmp_path / "a"), use_safetensors=True)
    theirs.set_active_adapters("a")
    close(logits(theirs), expected)
    pool = theirs.base_model.prefix_tuning.prefix_tunings["a"]["self_prefix"]
    assert type(pool).__name__ == ("PrefixTuning" if projection and arch != "llama" else "FlatPrefixTuning")


@pytest.mark.parametrize("insert_at", ["embeddings", "embeddings_after_first"])
@pytest.mark.parametrize("attn, pad", [("eager", True), ("sdpa", False)])
def test_deltatune_prompt_loads_in_adapterhub(insert_at: str, attn: str, pad: bool, tmp_path: Path) -> None:
    ours = build("bert", attn)
    dt.attach(ours, dt.PromptTuningConfig(num_virtual_tokens=N, insert_at=insert_at), "a")
    noise(ours, "site_adapters")
    dt.save(ours, tmp_path / "a", format="adapters")
    theirs = build("bert", hub=True)
    theirs.load_adapter(str(tmp_path / "a"), use_safetensors=True)
    theirs.set_active_adapters("a")
    close(logits(theirs, pad), logits(ours.eval(), pad))


def _config(folder: Path) -> dict[str, Any]:
    data = json.loads((folder / "adapter_config.json").read_text())
    return {k: v for k, v in data.items() if k != "model_name"}


@pytest.mark.parametrize("theirs_config, ours_config", [
    (lambda: adapters.PrefixTuningConfig(prefix_length=N, flat=True),
     lambda: dt.PrefixTuningConfig(num_virtual_tokens=N, token_positions="from_zero")),
    (lambda: adapters.PrefixTuningConfig(prefix_length=N, bottleneck_size=8),
     lambda: dt.PrefixTuningConfig(num_virtual_tokens=N, token_positions="from_zero", prefix_projection=True,
                                   encoder_hidden_size=8)),
    (lambda: adapters.PromptTuningConfig(prompt_length=N, combine="prefix_after_bos"),
     lambda: dt.PromptTuningConfig(num_virtual_tokens=N, insert_at="embeddings_after_first")),
], ids=["flat", "mlp", "prompt"])
def test_written_config_equals_adapterhubs(theirs_config: Any, ours_config: Any, tmp_path: Path) -> None:
    theirs = build("bert", hub=True)
    theirs.add_adapter("a", config=theirs_config())
    theirs.save_adapter(str(tmp_path / "theirs"), "a", with_head=False)
    ours = build("bert")
    dt.attach(ours, ours_config(), "a")
    dt.save(ours, tmp_path / "ours", format="adapters")
    assert _config(tmp_path / "ours") == _config(tmp_path / "theirs")


# --------------------------------------------------------------------------- refusals of real AdapterHub folders


REFUSED = {
    "gating": (lambda: adapters.PrefixTuningConfig(prefix_length=N, use_gating=True), "gpt2", r"use_gating=True"),
    "leave_out": (lambda: adapters.PrefixTuningConfig(prefix_length=N, leave_out=[0]), "gpt2", r"leave_out=\[0\]"),
    "t5": (lambda: adapters.PrefixTuningConfig(prefix_length=N), "t5", r"encoder_prefix=True: .*encoder-decoder"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_deltatune_cannot_reproduce_is_refused(case: str, tmp_path: Path) -> None:
    config, arch, match = REFUSED[case]
    theirs = build(arch, hub=True)
    theirs.add_adapter("a", config=config())
    theirs.save_adapter(str(tmp_path / "a"), "a")
    ours = build(arch)
    before, modules = {k: v.clone() for k, v in ours.state_dict().items()}, [n for n, _ in ours.named_modules()]
    with pytest.raises(dt.AdapterFileError, match=match):
        dt.load(ours, tmp_path / "a", name="a")
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, _ in ours.named_modules()] == modules


# --------------------------------------------------------------------------- AdapterHub's sdpa path, pinned


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "AdapterHub 1.3 on sdpa (transformers' default) with a padding mask: the causal mask is boolean (True = attend) "
    "and PrefixTuningLayer inverts its prefix mask as if it were additive, so the prefix is never attended (the "
    "output is the base model's); without a mask it passes is_causal with more keys than queries, which sdpa aligns "
    "to the top left, so token i sees prefix entries 0..i only. deltatune computes AdapterHub's eager result"))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("pad", [True, False], ids=["mask", "no_mask"])
def test_adapterhub_sdpa_prefix(arch: str, pad: bool, tmp_path: Path) -> None:
    theirs = build(arch, "sdpa", hub=True)
    theirs.add_adapter("a", config=adapters.PrefixTuningConfig(prefix_length=N, flat=True))
    theirs.set_active_adapters("a")
    noise(theirs, "prefix_tunings")
    theirs.save_adapter(str(tmp_path / "a"), "a")
    ours = build(arch, "sdpa")
    dt.load(ours, tmp_path / "a", name="a")
    close(logits(theirs, pad), logits(ours, pad))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "AdapterHub 1.3's BERT on sdpa with padding: the prompt's rows of the 4-d mask are filled with zeros (attend), so "
    "the prompt positions attend the padding; on eager (a mask over keys only) they do not, nor in deltatune"))
def test_adapterhub_sdpa_prompt_rows_attend_padding(tmp_path: Path) -> None:
    theirs, _ = theirs_with("bert", adapters.PromptTuningConfig(prompt_length=N), tmp_path / "a", attn="sdpa")
    ours = build("bert")
    dt.load(ours, tmp_path / "a", name="a")
    close(logits(theirs), logits(ours))
