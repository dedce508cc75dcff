"""One LoRA (or DoRA) training step, deltatune vs peft, side by side on CPU.

What
    Times one training step (forward + backward + AdamW step + zero_grad) of a
    random-init ~58M-parameter LLaMA (8 layers, hidden 512, batch 4 x 256 tokens, fp32)
    with LoRA r=16 / alpha=32 / dropout 0 on all linear layers except lm_head, and
    records the peak resident memory of the process. Three variants:

    floor      stock model, every parameter frozen, forward + backward down to the
               input embeddings (no optimizer): the cost no adapter library can avoid.
    peft       ``peft.get_peft_model(model, peft.LoraConfig(...))``.
    deltatune  ``dt.attach(model, dt.LoraConfig(...), name="default")``.

    With ``--dora`` both libraries get ``use_dora=True`` (everything else identical) and
    a fourth variant may be asked for:

    deltatune-lora  deltatune with plain LoRA (only with --dora), so that one run gives
                    "deltatune DoRA / deltatune LoRA" next to "deltatune DoRA / peft DoRA".

    And, with or without ``--dora``, a QLoRA variant:

    deltatune-qlora ``dt.quantize(model, dt.QuantConfig(quant_type="nf4", double_quant=True))``
                    then the same plain LoRA: "deltatune-qlora / deltatune" is QLoRA's cost
                    over LoRA on the unquantized base (its first-step loss differs: 4-bit base).

Why
    deltatune claims to be a drop-in for peft's LoRA. This shows whether it costs more
    time or memory per step, and how much of each library's overhead is its own (the
    part above ``floor``). It also checks that both libraries train the same number of
    parameters and start from the same loss (LoRA B is zero at init, so the first loss
    of every variant must match the stock model's).

How
    Each variant runs in a fresh child process (this same script with ``--variant X
    --json``), so that peak RSS (``ru_maxrss``) belongs to that variant alone. Children
    run interleaved (floor, peft, deltatune, floor, ...) for ``--repeats`` rounds so
    that slow drifts of the machine hit every variant alike; each child reports the
    median of its timed steps, and the parent reports the median over rounds.

    python bench/lora_step.py                       # full run, ~3 min on an idle 2-core box
    python bench/lora_step.py --repeats 3 --steps 8
    python bench/lora_step.py --variants floor peft  # a subset
    python bench/lora_step.py --wait-idle 600       # shared machine: wait for quiet
    python bench/lora_step.py --quick               # tiny model, ~20 s (CI smoke)
    python bench/lora_step.py --variant peft        # one child, human-readable
    python bench/lora_step.py --dora --variants peft deltatune deltatune-lora
    python bench/lora_step.py --quick --dora        # DoRA smoke test
    python bench/lora_step.py --variants floor deltatune deltatune-qlora   # QLoRA vs LoRA

The measuring itself (child processes, rounds, medians, machine facts) is shared with
``suite.py``, which runs every figure of the speed/memory issue in one command: see harness.py,
models.py and child.py.

The markdown table goes to stdout, the full result (all step times, machine facts,
the command line) to ``--out`` as JSON (default bench/results/lora_step.json, or
lora_step_quick.json with --quick; dora_step.json / dora_step_quick.json with
--dora). "MB" means MiB (2**20 bytes). The exit status
is 1 if deltatune and peft disagree on the trainable parameter count or a child fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from child import LORA_KWARGS, LR, NUM_THREADS, Spec, adapter_kwargs as spec_adapter_kwargs, run_spec
from harness import (BENCH_DIR, NOISY_CPU_FRAC, Summary, display_path, fmt, machine_facts,
                     paired_ratio, ratio, run_rounds as run_interleaved, spawn_json, summarize)
from models import FULL, QUICK, SEED, Shape

DEFAULT_VARIANTS: tuple[str, ...] = ("floor", "peft", "deltatune")
VARIANTS: tuple[str, ...] = (*DEFAULT_VARIANTS, "deltatune-lora", "deltatune-qlora")
# The adapter library behind each variant (None: no adapter).
LIBRARY: dict[str, str | None] = {
    "floor": None, "peft": "peft", "deltatune": "deltatune", "deltatune-lora": "deltatune",
    "deltatune-qlora": "deltatune",
}
PLAIN_LORA_VARIANTS = frozenset({"deltatune-lora", "deltatune-qlora"})  # stay LoRA under --dora
# child.py's name for each variant: deltatune-lora is deltatune with use_dora off.
CHILD_VARIANT: dict[str, str] = {"deltatune-lora": "deltatune"}


def benchmark_name(dora: bool) -> str:
    """'dora_step' or 'lora_step': the JSON's benchmark field and default file stem."""
    return "dora_step" if dora else "lora_step"


def default_out(quick: bool, dora: bool) -> Path:
    """bench/results/{lora,dora}_step[_quick].json, so --quick/--dora never clobber."""
    return BENCH_DIR / "results" / f"{benchmark_name(dora)}{'_quick' if quick else ''}.json"


def uses_dora(variant: str, dora: bool) -> bool:
    """Whether this variant's adapter is DoRA in a run with (or without) --dora."""
    return dora and LIBRARY[variant] is not None and variant not in PLAIN_LORA_VARIANTS


def adapter_kwargs(variant: str, dora: bool) -> dict[str, Any]:
    """The LoraConfig arguments of this variant: LORA_KWARGS, plus use_dora=True if DoRA."""
    return spec_adapter_kwargs(child_spec(variant, FULL, dora))


def label(variant: str, dora: bool) -> str:
    """Name in the table and ratios: the variant itself, or 'peft DoRA' etc. with --dora."""
    if not dora or LIBRARY[variant] is None:
        return variant
    return f"{LIBRARY[variant]} {'DoRA' if uses_dora(variant, dora) else 'LoRA'}"


# --------------------------------------------------------------------------- child


def child_spec(variant: str, shape: Shape, dora: bool) -> Spec:
    """The child.py measurement behind one of this script's variants."""
    return Spec(arch="llama", variant=CHILD_VARIANT.get(variant, variant), mode="train",
                seq_len=shape.seq_len, dora=uses_dora(variant, dora), quick=shape == QUICK)


def run_child(variant: str, shape: Shape, steps: int, warmup: int,
              dora: bool = False) -> dict[str, Any]:
    """Build, warm up, and time one variant in this process; return its measurements."""
    if variant not in LIBRARY:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    res = run_spec(child_spec(variant, shape, dora), steps, warmup, shape)
    return {**res, "variant": variant}


# -------------------------------------------------------------------------- parent


def spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--json"]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += [flag for flag, on in (("--quick", args.quick), ("--dora", args.dora)) if on]
    found = spawn_json(cmd)
    return {"variant": variant, "error": found} if isinstance(found, str) else found[-1]


def run_rounds(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Run the children interleaved, round by round; drop variants that skip or fail."""
    return run_interleaved(args.variants, lambda v: spawn(v, args), args.repeats, args.wait_idle)


def pair_ratios(summary: Summary, a: str, b: str,
                dora: bool) -> dict[str, float | None]:
    """a vs b: step time (ratio of medians, and median of per-round ratios), peak RSS, and
    peak RSS above floor; keyed by the variants' labels ('deltatune DoRA/peft DoRA step')."""
    def get(v: str, key: str) -> float | None:
        return summary.get(v, {}).get(key)

    def above_floor(v: str) -> float | None:
        rss, floor_rss = get(v, "peak_rss_mb"), get("floor", "peak_rss_mb")
        return None if rss is None or floor_rss is None else rss - floor_rss

    name = f"{label(a, dora)}/{label(b, dora)}"
    return {
        f"{name} step": ratio(get(a, "step_s"), get(b, "step_s")),
        f"{name} step, median of per-round ratios": paired_ratio(summary, a, b),
        f"{name} peak RSS": ratio(get(a, "peak_rss_mb"), get(b, "peak_rss_mb")),
        f"{name} RSS above floor": ratio(above_floor(a), above_floor(b)),
    }


def compute_ratios(summary: Summary,
                   dora: bool = False) -> dict[str, float | None]:
    """deltatune vs peft (time, RSS, RSS above floor), deltatune vs deltatune-lora when that
    ran (our DoRA / our LoRA), and each adapter variant vs floor."""
    def get(v: str, key: str) -> float | None:
        return summary.get(v, {}).get(key)

    ratios = pair_ratios(summary, "deltatune", "peft", dora)
    if "deltatune-lora" in summary:
        ratios.update(pair_ratios(summary, "deltatune", "deltatune-lora", dora))
    if "deltatune-qlora" in summary:
        ratios.update(pair_ratios(summary, "deltatune-qlora", "deltatune-lora" if dora else "deltatune", dora))
    for v in (v for v in VARIANTS if LIBRARY[v] is not None and v in summary):
        ratios[f"{label(v, dora)}/floor step"] = ratio(get(v, "step_s"), get("floor", "step_s"))
        ratios[f"{label(v, dora)}/floor peak RSS"] = ratio(get(v, "peak_rss_mb"),
                                                          get("floor", "peak_rss_mb"))
    return ratios


def check_trainable(summary: Summary) -> tuple[bool | None, str]:
    """Compare deltatune's trainable parameter count with peft's; None if one is missing."""
    pe, dt = summary.get("peft", {}), summary.get("deltatune", {})
    if pe.get("status") != "ok" or dt.get("status") != "ok":
        return None, "trainable-count check: not run (needs both peft and deltatune)"
    same = pe["trainable"] == dt["trainable"]
    msg = (f"trainable params: peft {pe['trainable']:,} (peft says {pe['lib_trainable']:,}), "
           f"deltatune {dt['trainable']:,} (deltatune says {dt['lib_trainable']:,}) -> "
           + ("MATCH" if same else "MISMATCH"))
    return same, msg


def markdown(summary: Summary, ratios: dict[str, float | None],
             dora: bool = False) -> str:
    """The result as two markdown tables: per variant (labelled 'peft DoRA' etc. with
    --dora), then the ratios."""
    floor = summary.get("floor", {})
    rows = ["| variant | median step s | peak RSS MB | step / floor | RSS / floor "
            "| RSS above floor MB |", "|---|---:|---:|---:|---:|---:|"]
    for v, s in summary.items():
        if s["status"] != "ok":
            rows.append(f"| {label(v, dora)} | {s['status']} | | | | |")
            continue
        above = None if "peak_rss_mb" not in floor else s["peak_rss_mb"] - floor["peak_rss_mb"]
        rows.append(
            f"| {label(v, dora)} | {s['step_s']:.3f} | {s['peak_rss_mb']:.0f} "
            f"| {fmt(ratio(s['step_s'], floor.get('step_s')), '.3f')} "
            f"| {fmt(ratio(s['peak_rss_mb'], floor.get('peak_rss_mb')), '.3f')} "
            f"| {fmt(above, '.0f')} |"
        )
    rows += ["", "| ratio | value |", "|---|---:|"]
    rows += [f"| {k} | {fmt(v, '.3f')} |" for k, v in ratios.items()]
    return "\n".join(rows)



def run_parent(args: argparse.Namespace) -> int:
    """Run all rounds, print the table, write the JSON; return the exit status."""
    shape = QUICK if args.quick else FULL
    method = "DoRA" if args.dora else "LoRA"
    print(f"{benchmark_name(args.dora)} ({method}): {'quick' if args.quick else 'full'} "
          f"model {asdict(shape)}, "
          f"{args.repeats} round(s) x {args.variants}, {args.warmup} warm-up + "
          f"{args.steps} timed steps per child", file=sys.stderr)
    runs = run_rounds(args)
    summary = summarize(runs)
    ratios = compute_ratios(summary, args.dora)
    match, match_msg = check_trainable(summary)
    losses = {v: s["loss_first"] for v, s in summary.items() if s["status"] == "ok"}

    if args.dora:
        lora = [v for v in args.variants if v in PLAIN_LORA_VARIANTS]
        print("DoRA (use_dora=True): "
              + ", ".join(v for v in args.variants if uses_dora(v, True))
              + (f"; plain LoRA: {', '.join(lora)}" if lora else "") + "\n")
    print(markdown(summary, ratios, args.dora))
    print()
    print(match_msg)
    print("first-step loss (must agree, but for the 4-bit base of deltatune-qlora: LoRA B starts at zero): "
          + ", ".join(f"{label(v, args.dora)} {x:.6f}" for v, x in losses.items()))
    for v, s in summary.items():
        if s["status"] != "ok":
            print(f"{v}: {s['status']}: {s['reason']}")
    busiest = max((s.get("other_cpu_frac_max", 0.0) for s in summary.values()), default=0.0)
    if busiest > NOISY_CPU_FRAC:
        print(f"WARNING: other processes used up to {busiest:.0%} of the CPU while steps were "
              "timed; the timings are not trustworthy. Rerun on an idle machine.")

    result = {
        "benchmark": benchmark_name(args.dora),
        "method": method,
        "command": shlex.join(sys.orig_argv),
        "settings": {"quick": args.quick, "shape": asdict(shape), "steps": args.steps,
                     "warmup": args.warmup, "repeats": args.repeats, "variants": args.variants,
                     "wait_idle_s": args.wait_idle,
                     "dora": args.dora, "lora": LORA_KWARGS,
                     "adapter_kwargs": {v: adapter_kwargs(v, args.dora) for v in args.variants
                                        if LIBRARY[v] is not None},
                     "labels": {v: label(v, args.dora) for v in args.variants},
                     "lr": LR, "threads": NUM_THREADS, "seed": SEED,
                     "dtype": "float32"},
        "machine": machine_facts(),
        "summary": summary,
        "ratios": ratios,
        "trainable_match": match,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {display_path(args.out)}", file=sys.stderr)
    failed = any("error" in r for rs in runs.values() for r in rs)
    return 1 if match is False or failed else 0


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --quick changes the defaults of --steps/--warmup/--repeats."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS,
                   help="run only this variant in this process (what the parent spawns)")
    p.add_argument("--json", action="store_true", help="with --variant: print one JSON line")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                   help="variants the parent runs, in this order each round (default: "
                        f"{' '.join(DEFAULT_VARIANTS)}; deltatune-lora only with --dora)")
    p.add_argument("--steps", type=int, help="timed steps per child (default 6; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default 2; quick 1)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 2; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny model and 2 steps: a smoke test")
    p.add_argument("--dora", action="store_true",
                   help="DoRA instead of LoRA (use_dora=True in both libraries' LoraConfig); "
                        "variant deltatune-lora stays plain LoRA for 'our DoRA / our LoRA'")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each child, wait up to this long for other processes to "
                        "stop using the CPU (for shared machines; default 0: don't wait)")
    p.add_argument("--out", type=Path,
                   help="JSON result path (default bench/results/lora_step.json; "
                        "with --quick, lora_step_quick.json; with --dora, dora_step.json / "
                        "dora_step_quick.json)")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    args.out = args.out if args.out is not None else default_out(args.quick, args.dora)
    if not args.dora and "deltatune-lora" in args.variants:
        p.error("variant deltatune-lora is only meaningful with --dora (it is deltatune's LoRA)")
    if not args.quick and args.steps < 5:
        p.error("--steps must be >= 5 for a full run (use --quick for a smoke test)")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("need --steps >= 1, --warmup >= 0, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parent (default) or child (--variant) entry point."""
    args = parse_args(argv)
    if args.variant is None:
        return run_parent(args)
    res = run_child(args.variant, QUICK if args.quick else FULL, args.steps, args.warmup,
                    args.dora)
    if args.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=2))
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
