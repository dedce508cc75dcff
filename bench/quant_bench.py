"""4-bit dequantize and matmul, deltatune vs bitsandbytes (CPU), and a QLoRA step vs a LoRA step.

What
    dequant    dequantize one NF4 double-quantized weight (``--size`` square, default 4096).
    matmul     the 4-bit linear forward: ``Linear4bit(x)`` vs ``bnb.nn.Linear4bit(x)``, x = 8 tokens.
    step       one training step (forward + backward) of a small LLaMA with LoRA r=16 on all
               linear layers: deltatune on the fp32 base ("lora") and on the NF4 base ("qlora").
    Each (task, library, dtype) runs in a fresh child process; each child reports the median of
    its timed repeats; rows are interleaved over --rounds rounds; the parent prints the medians
    over rounds, the ratio deltatune / bitsandbytes and the median of the per-round ratios.
    bitsandbytes is optional: without it only deltatune's numbers are printed.

How
    python bench/quant_bench.py            # 4096x4096, fp32 and bf16 (minutes; use an idle machine)
    python bench/quant_bench.py --quick    # 512x512 and a tiny model, a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _median_time(fn: object, repeats: int) -> float:
    call = fn  # type: ignore[assignment]
    call()  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(task: str, library: str, dtype_name: str, size: int, repeats: int) -> float:
    sys.path.insert(0, str(ROOT / "src"))
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    if task == "step":
        return _step(library, size, repeats)
    weight = torch.randn(size, size).to(dtype)
    x = torch.randn(8, size, dtype=dtype)
    if library == "bitsandbytes":
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        if task == "dequant":
            return _median_time(lambda: bnbf.dequantize_4bit(packed, state), repeats)
        layer = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to("cpu")
        with torch.no_grad():
            return _median_time(lambda: layer(x), repeats)
    from deltatune.quant import Linear4bit, dequantize_4bit, quantize_4bit

    if task == "dequant":
        packed, state = quantize_4bit(weight, "nf4", 64, True)
        return _median_time(lambda: dequantize_4bit(packed, state), repeats)
    ours = Linear4bit.from_weight(weight, compute_dtype=dtype)
    with torch.no_grad():
        return _median_time(lambda: ours(x), repeats)


def _step(library: str, hidden: int, repeats: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
    model = LlamaForCausalLM(config)
    if library == "qlora":
        dt.quantize(model, dt.QuantConfig())
    dt.attach(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, 1024, (2, 64))
    return _median_time(lambda: model(ids, labels=ids).loss.backward(), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each child fresh)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", nargs=5)
    args = parser.parse_args()
    if args.child:
        task, library, dtype_name, size, repeats = args.child
        print(json.dumps(child(task, library, dtype_name, int(size), int(repeats))))
        return
    size, repeats, step_hidden = (512, 3, 64) if args.quick else (4096, 9, 512)
    try:
        import bitsandbytes  # noqa: F401
        others = ["bitsandbytes"]
    except ImportError:
        others = []
    rows = [(t, d, lib) for t in ("dequant", "matmul") for d in ("float32", "bfloat16")
            for lib in ("deltatune", *others)]
    try:
        import transformers  # noqa: F401
        rows += [("step", "float32", lib) for lib in ("lora", "qlora")]
    except ImportError:
        print("transformers is not installed: the training-step rows are skipped")
    times: dict[tuple[str, str, str], list[float]] = {row: [] for row in rows}
    for rnd in range(args.rounds):  # interleaved: a slow spell of the machine hits every row alike
        for task, dtype_name, library in rows:
            n = step_hidden if task == "step" else size
            out = subprocess.run([sys.executable, __file__, "--child", task, library, dtype_name, str(n),
                                  str(repeats)], capture_output=True, text=True, check=True)
            times[(task, dtype_name, library)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {rnd + 1} {task:8s} {dtype_name:9s} {library:13s} "
                  f"{times[(task, dtype_name, library)][-1] * 1e3:9.2f} ms", flush=True)
    pairs = [(f"deltatune/bitsandbytes {t} {d}", (t, d, "deltatune"), (t, d, "bitsandbytes"))
             for t in ("dequant", "matmul") for d in ("float32", "bfloat16") if others]
    if ("step", "float32", "lora") in times:
        pairs.append(("qlora/lora step", ("step", "float32", "qlora"), ("step", "float32", "lora")))
    ratios = {name: {"ratio_of_medians": statistics.median(times[a]) / statistics.median(times[b]),
                     "median_of_round_ratios": statistics.median(x / y for x, y in zip(times[a], times[b]))}
              for name, a, b in pairs}
    for (task, dtype_name, library), values in times.items():
        print(f"{task:8s} {dtype_name:9s} {library:13s} median {statistics.median(values) * 1e3:9.2f} ms")
    for name, r in ratios.items():
        print(f"ratio {name}: {r['ratio_of_medians']:.2f} (median of per-round ratios "
              f"{r['median_of_round_ratios']:.2f})")
    if args.out:
        args.out.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "size": size, "repeats": repeats, "rounds": args.rounds,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "times_s": {" ".join(k): v for k, v in times.items()}, "ratios": ratios}, indent=1) + "\n")


if __name__ == "__main__":
    main()
