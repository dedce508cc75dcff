"""Tiny transformers models, inputs and file helpers shared by the prompt-space tests against peft
(test_prompt_peft: prompt tuning and P-tuning; test_prefix_peft: prefix tuning).

Every factory seeds torch before building, so two calls give identical models; ``batch`` gives the
same two rows (one padded) to every test of a model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from conftest import TOLERANCES, token_ids

N = 4
"""Virtual tokens of every adapter here."""
WIDTH = 32
"""Hidden size of every tiny model here."""
LABELS = 3
FP32_ATOL = TOLERANCES[torch.float32]["atol"]

Factory = Callable[[str], nn.Module]


# --------------------------------------------------------------------------- tiny models


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def gpt2(attn: str = "sdpa") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(config).eval()


def llama(attn: str = "sdpa") -> nn.Module:
    """Grouped-query attention: 4 heads, 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=128, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _bert_config(attn: str) -> Any:
    from transformers import BertConfig

    return BertConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=2, intermediate_size=64,
                      vocab_size=128, max_position_embeddings=64, num_labels=LABELS, attn_implementation=attn)


def bert_seq(attn: str = "sdpa") -> nn.Module:
    from transformers import BertForSequenceClassification

    _quiet()
    torch.manual_seed(0)
    return BertForSequenceClassification(_bert_config(attn)).eval()


def bert_tok(attn: str = "sdpa") -> nn.Module:
    from transformers import BertForTokenClassification

    _quiet()
    torch.manual_seed(0)
    return BertForTokenClassification(_bert_config(attn)).eval()


def bert_qa(attn: str = "sdpa") -> nn.Module:
    from transformers import BertForQuestionAnswering

    _quiet()
    torch.manual_seed(0)
    config = _bert_config(attn)
    config.num_labels = 2
    return BertForQuestionAnswering(config).eval()


def t5(attn: str = "sdpa") -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    _quiet()
    torch.manual_seed(0)
    config = T5Config(d_model=WIDTH, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=128,
                      decoder_start_token_id=0, attn_implementation=attn)
    return T5ForConditionalGeneration(config).eval()


MODELS: dict[str, tuple[Factory, str]] = {
    "gpt2": (gpt2, "CAUSAL_LM"),
    "llama": (llama, "CAUSAL_LM"),
    "bert-seq-cls": (bert_seq, "SEQ_CLS"),
    "bert-token-cls": (bert_tok, "TOKEN_CLS"),
    "t5": (t5, "SEQ_2_SEQ_LM"),
}
QA: dict[str, tuple[Factory, str]] = {"bert-qa": (bert_qa, "QUESTION_ANS")}
"""Question answering: kept out of the forward matrix, since peft's QA call drops token type ids."""


# --------------------------------------------------------------------------- inputs


def batch(model: str, padding: str = "left") -> dict[str, Tensor]:
    """Two rows of 8 tokens; row 1 has 3 padding positions on ``padding``'s side. BERT also gets
    token type ids (the last 3 positions segment B), T5 decoder input ids."""
    ids = token_ids(2, 8)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if model.startswith("bert"):
        types = torch.zeros_like(ids)
        types[:, 5:] = 1
        out["token_type_ids"] = types
    if model == "t5":
        out["decoder_input_ids"] = token_ids(2, 5, seed=2)
    return out


def logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def labels_for(model: str, inputs: dict[str, Tensor]) -> Tensor:
    """Causal LM: the tokens, padding ignored; T5: the decoder's tokens; sequence classification: a class per row."""
    if model == "t5":
        return inputs["decoder_input_ids"]
    if model == "bert-seq-cls":
        return torch.tensor([0, 2])
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


# --------------------------------------------------------------------------- files


def perturb_trainable(model: nn.Module, seed: int) -> None:
    """Seeded noise on every trainable tensor (the task head copies included), in name order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def file_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def config_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


def seeded_pair(factory: Callable[[str], nn.Module], theirs_config: Any, ours_config: Any, attn: str, seed: int
                ) -> tuple[nn.Module, nn.Module]:
    """(peft's model, deltatune's): the same tiny base, each adapter built right after the same seed
    (both libraries then draw the same initial values)."""
    import peft

    import deltatune as dt

    base = factory(attn)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(base, theirs_config)
    ours = factory(attn)
    torch.manual_seed(seed)
    dt.attach(ours, ours_config)
    return theirs.eval(), ours.eval()
