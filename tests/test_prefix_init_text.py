"""Prefix tuning started from a text's keys and values (``PrefixTuningConfig.prefix_init_text``, deltatune's
own: peft lacks it).

The oracle is the base model itself: with the prefix set to the text's cache, the adapted model fed tokens
S must give what the base gives on the text followed by S (the text at positions 0..n-1, S after it, as
peft numbers tokens behind a prefix), on GPT-2, LLaMA with grouped-query attention and BERT (whose text
positions must not see S: a 4-D mask). The text's ids are repeated (decoder tokenizer: 3 ids for 4 virtual
tokens) or cut (encoder tokenizer: [CLS] + 3 words + [SEP], 5 ids) to the prefix length, by this file's own
rule. Then: files (peft's keys only, peft loads the folder with the same outputs, deltatune too), adapters
already on the model switched off for the run, the model's training modes kept, refusals leaving the model
unchanged, and the command line's ``--prefix-init-text``. peft is a test oracle only.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from conftest import state_hash
from prompt_models import FP32_ATOL, N, batch, bert_tok, gpt2, llama, logits, max_diff
from task_fixtures import word_tokenizer

TEXT = "a1 b2 a3"
TASK = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "TOKEN_CLS"}
KIND = {"gpt2": "decoder", "llama": "decoder", "bert": "encoder"}


def sharp_bert(attn: str = "sdpa") -> nn.Module:
    """The tiny BERT with its matrices scaled by 10: at the default init its attention is so flat that
    whether the text positions see S changes the outputs by 2e-6, below what the oracle could tell apart."""
    model = bert_tok(attn)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10)
    return model


FACTORY = {"gpt2": gpt2, "llama": llama, "bert": sharp_bert}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A word-level tokenizer folder per kind (ids below every tiny model's vocabulary)."""
    folders = {}
    for kind in ("decoder", "encoder"):
        folders[kind] = tmp_path_factory.mktemp(f"tokenizer-{kind}")
        word_tokenizer(folders[kind], kind)
    return folders


def config(model: str, tokenizer: Path, **extra: Any) -> dt.PrefixTuningConfig:
    return dt.PrefixTuningConfig(**{"task_type": TASK[model], "num_virtual_tokens": N, "prefix_init_text": TEXT,
                                    "tokenizer_name_or_path": str(tokenizer), **extra})


def text_ids(tokenizer: Path) -> Tensor:
    """The text's ids (special tokens included) repeated or cut to N, as peft's TEXT rule says."""
    from transformers import AutoTokenizer

    ids = list(AutoTokenizer.from_pretrained(tokenizer)(TEXT)["input_ids"])
    return torch.tensor((ids * math.ceil(N / len(ids)))[:N])


def table_of(model: nn.Module, name: str = "default") -> Tensor:
    with torch.no_grad():
        return model.site_adapters[name].table().detach().clone()


def base_after_text(model: str, ids: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """The base model's logits for S when fed the text then S, at S's positions."""
    rows = inputs["input_ids"].shape[0]
    full = torch.cat([ids[None].expand(rows, -1), inputs["input_ids"]], 1)
    mask = torch.cat([torch.ones(rows, N, dtype=torch.long), inputs["attention_mask"]], 1)
    if model == "bert":  # a bidirectional model: the text positions see only the text, as when cached alone
        seen = mask[:, None, None, :].bool().expand(-1, 1, full.shape[1], -1).clone()
        seen[:, :, :N, N:] = False
        return logits(FACTORY[model](), {"input_ids": full, "attention_mask": seen})[:, N:]
    return logits(FACTORY[model](), {"input_ids": full, "attention_mask": mask})[:, N:]


@pytest.mark.parametrize("model", ["gpt2", "llama", "bert"])
def test_prefix_is_the_texts_cache(model: str, tokenizers: dict[str, Path]) -> None:
    tokenizer = tokenizers[KIND[model]]
    ours = dt.attach(FACTORY[model](), config(model, tokenizer)).eval()
    inputs = batch("llama")  # two rows of 8 tokens, row 1 left-padded
    real = inputs["attention_mask"].bool()
    got = logits(ours, inputs)[real]
    assert max_diff(got, base_after_text(model, text_ids(tokenizer), inputs)[real]) <= FP32_ATOL
    assert max_diff(got, logits(FACTORY[model](), inputs)[real]) > 1e-3  # the prefix changes the outputs


def test_saved_folder_is_peft_s_and_loads_in_both(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    import peft

    ours = dt.attach(llama(), config("llama", tokenizers["decoder"])).eval()
    dt.save(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    plain = dt.attach(llama(), dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    dt.save(plain, tmp_path / "plain")
    assert set(written) == set(json.loads((tmp_path / "plain" / "adapter_config.json").read_text()))
    inputs = batch("llama")
    want = logits(ours, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # peft's word for keys it does not know
    assert max_diff(logits(theirs, inputs), want) <= FP32_ATOL
    loaded = dt.load(llama(), tmp_path, trainable=True).eval()
    assert torch.equal(logits(loaded, inputs), want)
    assert torch.equal(table_of(loaded), table_of(ours))


def test_other_adapters_are_off_while_the_text_runs(tokenizers: dict[str, Path]) -> None:
    """A LoRA active on the model does not reach the prefix: the text runs through the base alone."""
    model = dt.attach(llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora_out = logits(model, batch("llama"))
    dt.attach(model, config("llama", tokenizers["decoder"]), name="prefix")
    alone = dt.attach(llama(), config("llama", tokenizers["decoder"]))
    assert torch.equal(table_of(model, "prefix"), table_of(alone))
    assert torch.equal(logits(model, batch("llama")), lora_out)  # LoRA stays the active adapter


def test_training_mode_kept_and_no_dropout_in_the_prefix(tokenizers: dict[str, Path]) -> None:
    """GPT-2 has dropout 0.1: the text runs in evaluation mode, and every module's mode is given back."""
    model = gpt2().train()
    model.transformer.h[0].eval()  # a mixed state, kept as it was
    modes = [m.training for m in model.modules()]
    dt.attach(model, config("gpt2", tokenizers["decoder"]))
    assert [m.training for m in model.modules() if not _adapter_part(model, m)] == modes
    assert torch.equal(table_of(model), table_of(dt.attach(gpt2(), config("gpt2", tokenizers["decoder"]))))


def _adapter_part(model: nn.Module, module: nn.Module) -> bool:
    return any(module is m for m in model.site_adapters.modules())


@pytest.mark.parametrize(("extra", "field"), [
    ({"prefix_projection": True}, "prefix_projection"),
    ({"init_weights": "zero"}, "init_weights"),
    ({"tokenizer_name_or_path": None}, "tokenizer_name_or_path"),
    ({"prefix_init_text": ""}, "prefix_init_text"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "task_type"),
])
def test_config_refusals(extra: dict[str, Any], field: str, tokenizers: dict[str, Path]) -> None:
    with pytest.raises(dt.ConfigError, match=field):
        config("llama", tokenizers["decoder"], **extra)
    with pytest.raises(dt.ConfigError, match="tokenizer_name_or_path"):
        dt.PrefixTuningConfig(num_virtual_tokens=N, tokenizer_name_or_path="somewhere")


def test_refused_attach_leaves_the_model_unchanged(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    small = llama()
    small.resize_token_embeddings(6)  # the tokenizer's "a1" is id 6: past this vocabulary
    before = state_hash(small)
    with pytest.raises(dt.ConfigError, match="past the model's 6 embeddings"):
        dt.attach(small, config("llama", tokenizers["decoder"]))
    assert state_hash(small) == before and not hasattr(small, "site_adapters")
    merged = dt.attach(llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    dt.merge(merged)
    before = state_hash(merged)
    with pytest.raises(dt.AdapterError, match="merged"):
        dt.attach(merged, config("llama", tokenizers["decoder"]), name="prefix")
    assert state_hash(merged) == before
    with pytest.raises(dt.ConfigError, match="tokenizer could not be loaded"):
        dt.attach(llama(), config("llama", tmp_path / "none"))


def test_command_line_option(tokenizers: dict[str, Path]) -> None:
    """``--prefix-init-text`` reaches the config through the prefix-tuning recipe, with the base's tokenizer."""
    from deltatune.cli import build_parser
    from deltatune.registry import RecipeInput, recipe_named
    from deltatune.train.options import split_options

    parsed = build_parser()[0].parse_args(["train", "--method", "prefix-tuning", "--prefix-init-text", TEXT])
    assert parsed.prefix_init_text == TEXT
    run, _ = split_options({"method": "prefix-tuning", "num_virtual_tokens": N, "prefix_init_text": TEXT})
    common = {"task_type": "CAUSAL_LM", "modules_to_save": None}
    built = recipe_named("prefix-tuning").build(RecipeInput(run.method_options, None, None, common, 1,
                                                            str(tokenizers["decoder"])))
    assert built == config("llama", tokenizers["decoder"])
    run, _ = split_options({"method": "prefix-tuning"})
    plain = recipe_named("prefix-tuning").build(RecipeInput(run.method_options, None, None, common, 1, "base"))
    assert plain.prefix_init_text is None and plain.tokenizer_name_or_path is None
