"""One rank of a data-parallel training run for tests/test_distributed.py, started by torchrun.

Every rank builds the same tiny model and data (seeded), trains with ``deltatune.train.Trainer``
(which reads the world from torchrun's environment) and writes its adapter tensors to
``<out>/rank<R>.safetensors``, so the test can compare ranks with each other and with one process.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn

import deltatune as dt
from deltatune.io import adapter_tensors, gathered
from deltatune.train import TrainConfig, Trainer, distributed
from deltatune.train.tasks.causal_lm import CausalLM
from deltatune.train.tasks.seq_cls import SequenceClassification
from deltatune.train.trainer import seed_everything
from test_train import StopAt, make_run  # this script's folder (tests/) is first on sys.path


def build(model_dir: Path, data: Path) -> tuple[nn.Module, SequenceClassification, list[Any], list[Any]]:
    """Model + task + features as a run builds them (test_train's), without LoRA dropout, so runs can
    agree exactly (the tiny BERT itself is saved without dropout by the test)."""
    return make_run(model_dir, data, dropout=0.0)


class Tokens:
    """The two ids the causal-LM task needs from a tokenizer (the features below are ids already)."""

    pad_token_id, eos_token_id = 0, 1


def build_lm(quantize: str = "none") -> tuple[nn.Module, CausalLM, list[Any], list[Any]]:
    """A tiny LLaMA and rows whose labelled tokens (the completion) vary in number: the ranks' micro-batches
    hold different token counts, so only a global normaliser makes 2 x 4 rows equal 1 x 8 rows.
    ``quantize`` ("nf4", "fp4", ...): the base's linear layers stored in 4 bits first (QLoRA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                         max_position_embeddings=64))
    if quantize != "none":
        dt.quantize(model, dt.QuantConfig(quant_type=quantize))
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                   task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(5)
    features = []
    for _ in range(64):
        length = int(torch.randint(4, 24, (), generator=generator))
        prompt = int(torch.randint(1, length - 1, (), generator=generator))
        ids = torch.randint(2, 128, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return model, CausalLM(Tokens()), features, []


def config(out: Path, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = {"output_dir": str(out), "max_steps": 6, "batch_size": 8, "lr": 5e-3,
                            "progress": False, "log_every": 2}
    return TrainConfig(**{**base, **changes})


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors, whole (a sharded one is gathered: every rank must call this)."""
    return {k: gathered(t).detach().clone().contiguous() for k, t in adapter_tensors(model, "default").items()}


class Fail:
    """A loss term that raises on ``rank`` at ``step`` (a rank failing mid-run); adds nothing otherwise."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step, self.calls = rank, step, 0

    def __call__(self) -> Tensor:
        self.calls += 1
        if int(os.environ["RANK"]) == self.rank and self.calls >= self.step:
            raise RuntimeError(f"rank {self.rank} failed on purpose")
        return torch.zeros(())


def layout(model: nn.Module) -> dict[str, Any]:
    """How this rank holds the model: the types of its parameters, and per buffer (the packed 4-bit weights
    and their scales) its type and element count, to show what ``fully_shard`` split and what it left whole."""
    return {"parameters": sorted({type(p).__name__ for p in model.parameters()}),
            "buffers": {name: [type(b).__name__, b.numel()] for name, b in model.named_buffers()
                        if name.endswith(".weight")}}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "data", "out"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    for name, default in (("batch", 4), ("accum", 1), ("steps", 6), ("save-every", 0), ("stop-at", 0),
                          ("fail-rank", -1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (TrainConfig.fsdp)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lm", action="store_true", help="the causal LM (token-weighted loss) instead of BERT")
    parser.add_argument("--quantize", default="none", help="the causal LM's base in 4 bits (nf4, fp4, int4_group)")
    parser.add_argument("--checkpointing", action="store_true", help="TrainConfig.gradient_checkpointing")
    parser.add_argument("--kernels", action="store_true", help="TrainConfig.accelerate (deltatune's fused kernels)")
    parser.add_argument("--cuda", action="store_true", help="each rank on its own GPU (cuda:LOCAL_RANK), NCCL")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.cuda else torch.device("cpu")
    if args.fsdp:  # the group outlives fit: gathering the sharded adapter afterwards needs it
        if args.cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if args.cuda else "gloo")
    model, task, train, test = build_lm(args.quantize) if args.lm else build(args.model, args.data)
    model.to(device)  # the trainer puts batches where the adapter lives and picks the backend from it
    trainer = Trainer(model, task, train, test,
                      config(args.out / "run", batch_size=args.batch, grad_accum=args.accum, max_steps=args.steps,
                             save_every=args.save_every, fsdp=args.fsdp, bf16=args.bf16,
                             gradient_checkpointing=args.checkpointing, accelerate=args.kernels),
                      callbacks=[StopAt(args.stop_at)] if args.stop_at else [],
                      loss_terms=[Fail(args.fail_rank, 3)] if args.fail_rank >= 0 else [])
    result = trainer.fit(resume=args.resume)
    save_file({k: t.cpu() for k, t in adapter_state(model).items()}, str(args.out / f"rank{os.environ['RANK']}.safetensors"))
    if args.quantize != "none":
        (args.out / f"layout{os.environ['RANK']}.json").write_text(json.dumps(layout(model)))
    if args.fsdp:
        distributed.finish()  # a barrier first: the gathers above must be released before Python exits
    print(f"rank {os.environ['RANK']}: {result.steps} steps, loss {result.train_loss:.6f}")


if __name__ == "__main__":
    main()
