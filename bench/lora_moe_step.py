"""LoRA on the fused experts of a Mixtral-style model: deltatune vs peft, one training step on CPU.

What
    A random-init Mixtral (4 layers, hidden 256, 8 experts of width 512, top-2; ~19M parameters)
    with LoRA r=8 / alpha=16 on every expert weight (``target_parameters=["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"]``) and on q_proj / v_proj. Reports, for peft and deltatune with the
    same adapter tensors: the largest logit difference, the trainable parameter count, and the
    median time of a training step (forward + backward + AdamW + zero_grad, batch 4 x 128, fp32).

How
    python bench/lora_moe_step.py [--steps 8]

    Both models run in this one process, alternating step by step, so drifts of a shared
    machine hit both alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch
import transformers

import deltatune as dt
from deltatune.io import adapter_tensors

TARGETS = dict(target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                        "mlp.experts.down_proj"],
               r=8, lora_alpha=16, init_lora_weights=False)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=256)
    base = transformers.AutoModelForCausalLM.from_config(config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**TARGETS))
    ours = dt.attach(base, dt.LoraConfig(**TARGETS))
    live = adapter_tensors(ours, "default")
    with torch.no_grad():
        for key, param in theirs.named_parameters():
            if "lora_" in key:
                live[key.replace(".default", "")].copy_(param)
    return theirs, ours


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    theirs, ours = models()
    ids = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids).logits).abs().max().item()
    counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in
              (("peft", theirs), ("deltatune", ours))}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for name, m in (("peft", theirs), ("deltatune", ours))}
    times: dict[str, list[float]] = {"peft": [], "deltatune": []}
    for i in range(args.steps + 1):  # the first step of each warms up and is not counted
        for name, model in (("peft", theirs), ("deltatune", ours)):
            seconds = step(model, optimizers[name], ids)
            if i:
                times[name].append(seconds)
    print(f"max |logits peft - deltatune| before training: {diff:.3g}")
    for name in times:
        print(f"{name}: {counts[name]:,} trainable parameters, median step {statistics.median(times[name]):.3f} s "
              f"(min {min(times[name]):.3f}, max {max(times[name]):.3f}, {args.steps} steps)")


if __name__ == "__main__":
    main()
