"""Mixed-adapter batches, side by side with peft: the cost of routing rows to many adapters.

One process, one base (the benchmark LLaMA of ``bench/models.py``, fp32, eval mode, no grad), the
same batch for every variant. For each library, rank-16 LoRA adapters on every linear layer, then:

- ``one``: every row on one adapter (deltatune: ``dt.set_active``; peft: ``set_adapter``);
- ``mixed-K``: the rows spread round-robin over K adapters (deltatune: ``adapter_names=``, served
  by ``dt.routing``; peft: its ``adapter_names=`` keyword).

Variants run interleaved, ``--rounds`` times; the table gives medians and each mixed variant's
ratio to the same library's ``one`` (per round, then the median). Results go to
``bench/results/routing.json``.

    .venv/bin/python bench/routing_bench.py [--quick] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from models import build_llama, shape_for

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


def _adapters(count: int) -> list[str]:
    return [f"a{i}" for i in range(count)]


def deltatune_model(base: Any, count: int) -> Any:
    import deltatune as dt

    model = copy.deepcopy(base)
    for name in _adapters(count):
        dt.attach(model, dt.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                       init_lora_weights=False), name=name)
    dt.set_active(model, "a0")
    return model.eval()


def peft_model(base: Any, ours: Any, count: int, folder: Path) -> Any:
    """peft's model with the same adapters as ``ours`` (saved by deltatune, loaded by peft)."""
    import deltatune as dt
    import peft

    names = _adapters(count)
    dt.save(ours, folder, names=names)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    model.set_adapter(names[0])
    return model.eval()


def variants(base: Any, counts: list[int], rows: int, inputs: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Every (library, batch kind) to time, as a no-argument call."""
    most = max(counts)
    ours = deltatune_model(base, most)
    with tempfile.TemporaryDirectory() as folder:
        theirs = peft_model(base, ours, most, Path(folder))
    out: dict[str, Callable[[], Any]] = {
        "deltatune one": lambda: ours(**inputs),
        "peft one": lambda: theirs(**inputs),
    }
    for count in counts:
        names = [_adapters(count)[i % count] for i in range(rows)]
        out[f"deltatune mixed-{count}"] = lambda names=names: ours(**inputs, adapter_names=names)
        out[f"peft mixed-{count}"] = lambda names=names: theirs(**inputs, adapter_names=names)
    return out


def check_equal(calls: dict[str, Callable[[], Any]], counts: list[int]) -> dict[str, float]:
    """Both libraries compute the same logits for each kind of batch (max abs difference)."""
    with torch.no_grad():
        kinds = ["one", *(f"mixed-{c}" for c in counts)]
        return {k: (calls[f"deltatune {k}"]().logits - calls[f"peft {k}"]().logits).abs().max().item() for k in kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model (checks the script runs)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--counts", type=int, nargs="*", default=[4, 32])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = shape_for("llama", args.quick, args.seq_len)
    torch.manual_seed(0)
    base = build_llama(shape).float().eval()
    inputs = {"input_ids": torch.randint(0, shape.vocab_size, (args.rows, shape.seq_len),
                                         generator=torch.Generator().manual_seed(1))}
    calls = variants(base, args.counts, args.rows, inputs)
    diffs = check_equal(calls, args.counts)
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for key, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    report = summarize(times, args.counts, diffs, vars(args))
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / ("routing_quick.json" if args.quick else "routing.json")
    out.write_text(json.dumps(report, indent=2) + "\n")


def summarize(times: dict[str, list[float]], counts: list[int], diffs: dict[str, float],
              settings: dict[str, Any]) -> dict[str, Any]:
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratios = {}
    for lib in ("deltatune", "peft"):
        for count in counts:
            mixed, one = times[f"{lib} mixed-{count}"], times[f"{lib} one"]
            ratios[f"{lib} mixed-{count} / one"] = statistics.median(m / o for m, o in zip(mixed, one))
    return {"settings": settings, "median_s": medians, "ratio_to_one": ratios, "max_abs_diff_vs_peft": diffs,
            "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
