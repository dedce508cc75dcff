"""QA-LoRA against LoRA on an int4_group SmolLM2 base: held-out loss of the trained adapter, and
after merging it into the 4-bit weights (``dt.unload(merge=True, requantize=True)``).

    python examples/qalora_merge.py --data ../shared/data/wordnet/glosses.jsonl --steps 40 --group 64

The numbers it prints are the table in docs/quantization.md ("Lossless 4-bit merge").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from finetune_smollm2 import GGUF, chat_rows, model_folder  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import TrainConfig, Trainer, rows_from, seed_everything  # noqa: E402
from deltatune.train.tasks.causal_lm import CausalLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wordnet/glosses.jsonl"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--group", type=int, default=64, help="the base's and the adapter's group size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    task = CausalLM(tokenizer, max_length=128, max_new_tokens=32)
    train_rows = rows_from(chat_rows(args.data, "train", 800, 0), "wordnet train")
    eval_rows = rows_from(chat_rows(args.data, "validation", 48, 1), "wordnet validation")
    for qalora in (True, False):
        seed_everything(0)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
        dt.quantize(model, dt.QuantConfig(quant_type="int4_group", group_size=args.group))
        extra = {"use_qalora": True, "qalora_group_size": args.group} if qalora else {}
        dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type=task.task_type, **extra))
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(output_dir=out, max_steps=args.steps, batch_size=8, lr=1e-3, warmup_ratio=0.1,
                                 log_every=10, seed=0)
            trainer = Trainer(model, task, task.encode(train_rows), task.encode(eval_rows), config)
            before = trainer.evaluate()["loss"]
            start = time.time()
            after = trainer.fit().metrics["loss"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dt.unload(model, merge=True, requantize=True)
        warned = sum("re-quantizing" in str(w.message) for w in caught)
        model.eval()
        merged = task.evaluate(model, task.encode(eval_rows), 8)["loss"]
        print(f"{'QA-LoRA' if qalora else 'LoRA'} G={args.group} steps={args.steps}: base {before:.4f} adapter "
              f"{after:.4f} merged+requantized {merged:.4f} (lossy re-quantize warnings: {warned}) "
              f"train {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
