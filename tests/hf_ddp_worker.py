"""One process of a ``transformers.Trainer`` run on a deltatune-adapted tiny LLaMA, for tests/test_hf_ddp.py.

Started by ``accelerate launch`` / ``torchrun`` (the Trainer reads the world from the environment and wraps
the model in ``DistributedDataParallel``) or by plain ``python`` (the 1-process reference). Every process
builds the same model and rows (seeded), trains (a checkpoint at the last step, with deltatune's
callback), saves with ``trainer.save_model`` and writes its adapter tensors to ``<out>/rank<R>.safetensors`` and what it saw to ``<out>/rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import deltatune as dt
from deltatune.io import adapter_tensors
from deltatune.train import adapter_checkpoint_callback, distributed

ROWS, LENGTH = 64, 12


def plain_llama() -> nn.Module:
    """A random 2-layer LLaMA, seeded: every process (and the test) builds the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                        max_position_embeddings=64))


def tiny_llama() -> nn.Module:
    """``plain_llama`` with LoRA on q and v, dropout 0 (so that different batch layouts can agree exactly)."""
    return dt.attach(plain_llama(), dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"]))


def rows() -> list[dict[str, Any]]:
    """Rows of one length, labelled in full: every micro-batch holds the same number of loss tokens, so the
    mean of the processes' mean losses is the mean over the global batch."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(ROWS):
        ids = torch.randint(2, 128, (LENGTH,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Tensor]:
    return {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "labels")}


def main() -> None:
    from transformers import Trainer, TrainingArguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="TrainingArguments.gradient_checkpointing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_llama()
    training = TrainingArguments(output_dir=str(args.out / "run"), max_steps=args.steps,
                                 per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
                                 learning_rate=1e-2, seed=0, report_to=[], use_cpu=True, logging_steps=1,
                                 disable_tqdm=True, save_steps=args.steps, gradient_checkpointing=args.checkpointing)
    trainer = Trainer(model=model, args=training, train_dataset=rows(), data_collator=collate,
                      callbacks=[adapter_checkpoint_callback()])
    seen: list[list[int]] = []  # the first token of each row this process trained on, per micro-batch
    hook = model.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw["input_ids"][:, 0].tolist()),
                                           with_kwargs=True)
    trainer.train()
    hook.remove()
    trainer.save_model(str(args.out / "final"))
    rank = trainer.args.process_index
    save_file({k: t.detach().contiguous() for k, t in adapter_tensors(model, "default").items()},
              str(args.out / f"rank{rank}.safetensors"))
    wrapper = type(trainer.model_wrapped).__name__
    frozen_grads = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
    (args.out / f"rank{rank}.json").write_text(json.dumps({
        "world": trainer.args.world_size, "wrapper": wrapper, "seen": seen, "frozen_grads": frozen_grads,
        "find_unused": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}))
    distributed.finish()  # the group accelerate started: a barrier, so its last collectives are released before exit


if __name__ == "__main__":
    main()
