"""Does 8-bit AdamW track fp32 AdamW on a real fine-tune? LoRA on all-MiniLM-L6-v2, both optimizers.

Runs ``deltatune train``'s machinery twice with the same seed, data order and schedule, once with
``--optimizer adamw`` and once with ``--optimizer adamw8bit``, then prints both loss curves (from
each run's ``metrics.jsonl``), the final evaluation and the optimizer state each run held,
counted from the tensors of its last checkpoint. LoRA rank 16 puts the adapter matrices
(16 x 384 = 6,144 values) above AdamW8bit's ``min_8bit_size`` of 4,096, so they, and the BERT
pooler trained with the head, get 8-bit states; the 2-way head and biases stay fp32.

Usage (from the project root)::

    python examples/compare_adamw8bit.py --max-steps 100 --output runs/compare-adamw8bit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deltatune.train import TrainConfig
from deltatune.train.checkpoint import latest_checkpoint, read_trainer_state
from deltatune.train.options import RunOptions
from deltatune.train.run import train_run

OPTIMIZERS = ("adamw", "adamw8bit")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/compare-adamw8bit"))
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (>= 11 puts A and B in 8 bits)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--max-eval-rows", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def run_one(optimizer: str, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Train with ``optimizer``; returns the final metrics and the seconds it took."""
    run = RunOptions(r=args.rank, lora_alpha=2.0 * args.rank, max_eval_rows=args.max_eval_rows,
                     threads=args.threads)
    config = TrainConfig(output_dir=str(args.output / optimizer), max_steps=args.max_steps,
                         batch_size=args.batch_size, lr=args.lr, optimizer=optimizer, log_every=args.log_every,
                         save_every=args.max_steps, progress=False, seed=0)
    start = time.perf_counter()
    result = train_run(run, config, say=lambda line: print(f"  [{optimizer}] {line}"))
    return result.metrics, time.perf_counter() - start


def loss_curve(folder: Path) -> dict[int, float]:
    """Step -> logged training loss, from the run's metrics.jsonl."""
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def state_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of optimizer state, trainable values), counted from the last checkpoint's tensors."""
    checkpoint = latest_checkpoint(folder / "checkpoints")
    if checkpoint is None:
        raise SystemExit(f"{folder} has no checkpoint")
    optimizer = read_trainer_state(checkpoint)["optimizer"]
    state = optimizer["state"].values()
    total = sum(t.numel() * t.element_size() for s in state for k, t in s.items()
                if isinstance(t, torch.Tensor) and k != "step")
    values = sum(s["exp_avg"].numel() for s in state)
    return total, values


def main() -> None:
    args = parse_args()
    results = {name: run_one(name, args) for name in OPTIMIZERS}
    curves = {name: loss_curve(args.output / name) for name in OPTIMIZERS}
    print(f"\nloss every {args.log_every} steps (LoRA r={args.rank}, lr {args.lr}, batch {args.batch_size})")
    print(f"{'step':>6} {'adamw':>9} {'adamw8bit':>10} {'diff':>8}")
    for step in sorted(curves["adamw"]):
        a, b = curves["adamw"][step], curves["adamw8bit"][step]
        print(f"{step:>6} {a:>9.4f} {b:>10.4f} {b - a:>+8.4f}")
    for name in OPTIMIZERS:
        metrics, seconds = results[name]
        total, values = state_bytes(args.output / name)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{name:>10}: {shown}; optimizer state {total:,} bytes for {values:,} values "
              f"({total / values:.2f} bytes/value); {seconds:.0f} s")


if __name__ == "__main__":
    main()
