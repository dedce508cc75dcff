"""How long a hot-swap takes next to a fresh load, for a rank-16 LoRA on every linear layer of the benchmark LLaMA.

What
    The benchmark LLaMA of ``models.py`` (hidden 512, 8 layers, ~58M parameters, fp32, random init),
    LoRA r=16 / alpha=32 on all linear layers but lm_head (56 layers, 1.26M adapter values, a 4.8 MiB
    safetensors file). Two such adapters with different values are saved; then, each the median of
    ``--repeats`` timed calls after one untimed call:

    fresh load      ``dt.load(model, folder, name="fresh")`` (the adapter is deleted again, untimed);
    hotswap         ``dt.hotswap(model, folder)`` into the loaded "default" adapter, alternating folders;
    hotswap padded  the same into a slot padded by ``dt.prepare_hotswap(model, target_rank=32)``;
    hotswap r8      a rank-8 adapter (alpha 16) swapped into that padded slot and back to rank 16;
    read file       ``safetensors`` reading the file alone: the part of any load that is disk and parsing.

    Every call reads its folder from disk (page cache). The tensor objects of the swapped adapter are
    checked to be the same before and after the swaps.

How
    python bench/hotswap_bench.py --threads 1   # the 58M LLaMA, about 20 s
    python bench/hotswap_bench.py --quick       # the tiny LLaMA, a smoke test
    Options: --repeats N (default 15), --threads T (torch threads; default: torch's own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import deltatune as dt  # noqa: E402
from models import build_model, shape_for  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def median_ms(call: Callable[[], object], repeats: int, after: Callable[[], object] = lambda: None) -> float:
    """The median wall time of ``call`` in milliseconds (``after`` runs untimed after each call)."""
    call()
    after()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        after()
    return 1000 * statistics.median(times)


def adapter_tensors(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """Adapter ``name``'s parameters (its layer deltas')."""
    return [p for key, p in model.named_parameters() if f".deltas.{name}." in key]


def save_adapter(model: torch.nn.Module, folder: Path, r: int, alpha: float, seed: int) -> Path:
    """A LoRA adapter of rank ``r`` with seeded random values on ``model``'s linear layers, saved to ``folder``."""
    dt.attach(model, dt.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False),
              name="tmp")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_tensors(model, "tmp"):
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    dt.save(model, folder, ["tmp"])
    dt.delete_adapter(model, "tmp")
    return folder / "tmp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny LLaMA (a smoke test)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = shape_for("llama", args.quick)
    model = build_model("llama", shape).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        first, second = (save_adapter(model, root / f"a{seed}", 16, 32, seed) for seed in (1, 2))
        small = save_adapter(model, root / "r8", 8, 16, 3)
        size_mb = (first / "adapter_model.safetensors").stat().st_size / 2**20
        rows = {"read file": median_ms(lambda: load_file(first / "adapter_model.safetensors"), args.repeats)}
        rows["fresh load"] = median_ms(lambda: dt.load(model, first, name="fresh"), args.repeats,
                                       after=lambda: dt.delete_adapter(model, "fresh"))
        dt.load(model, first)
        tensors = [(p, p.data_ptr()) for p in adapter_tensors(model, "default")]
        folders = iter([second, first] * (args.repeats + 1))
        rows["hotswap"] = median_ms(lambda: dt.hotswap(model, next(folders)), args.repeats)
        assert [(p, p.data_ptr()) for p in adapter_tensors(model, "default")] == tensors
        dt.prepare_hotswap(model, target_rank=32)
        folders = iter([second, first] * (args.repeats + 1))
        rows["hotswap padded"] = median_ms(lambda: dt.hotswap(model, next(folders)), args.repeats)
        folders = iter([small, first] * (args.repeats + 1))
        rows["hotswap r8"] = median_ms(lambda: dt.hotswap(model, next(folders)), args.repeats)
    layers = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear)) - 1
    print(f"LLaMA hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, LoRA r=16 on {layers} linear layers, "
          f"file {size_mb:.1f} MiB, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    for name, ms in rows.items():
        print(f"  {name:<15} {ms:8.2f} ms  ({ms / rows['fresh load']:.2f} x fresh load)")


if __name__ == "__main__":
    main()
