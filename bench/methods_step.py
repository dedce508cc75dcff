"""Every method of the MiniLM method comparison: its training step time relative to LoRA r=8's, side by side.

What
    For each cell of a sweep file (by default experiments/methods_minilm.yaml: LoRA, rsLoRA, DoRA, PiSSA,
    LoRA+, AdaLoRA, VeRA, IA3, BitFit, Houlsby, Pfeiffer, parallel bottleneck, MixLoRA, prompt tuning,
    P-tuning, prefix tuning) and a frozen-base floor: the median time of one training step on
    all-MiniLM-L6-v2 with a 2-label head (fp32, batch 16 x 64 tokens of the shipped sentiment data, one torch
    thread), each method attached exactly as `deltatune train` attaches it for that cell (methods_child.py),
    with its trainable parameter count and the child's peak RSS. Reported per method: median step, step /
    LoRA's (ratio of medians, and median of per-round ratios), step / the floor's, the same per-round ratio
    of thread CPU time, peak RSS and RSS above the floor's.

Why
    Issue 19's comparison table needs step times that can be compared between methods, and issue 16 the
    prompt methods' step relative to LoRA's. The sweep's own wall times come from runs trained one after
    another on a shared machine over hours: a neighbour's busy spell lands on some methods and not others.
    Here every method runs in fresh processes, interleaved round by round, so a slow spell hits all alike.

How
    OMP_NUM_THREADS=1 .venv/bin/python bench/methods_step.py                 # 5 rounds, ~17 children each
    OMP_NUM_THREADS=1 .venv/bin/python bench/methods_step.py --repeats 3 --only lora prompt-tuning
    OMP_NUM_THREADS=1 .venv/bin/python bench/methods_step.py --wait-idle 300  # shared machine
    OMP_NUM_THREADS=1 .venv/bin/python bench/methods_step.py --quick          # tiny random BERT: a smoke test

    Measuring is harness.py's: a fresh child per measurement (peak RSS is its own), interleaved rounds
    (every other round in reverse order, so no method always runs first or next to the same neighbour),
    each child the median of its timed steps, the parent medians over rounds and medians of per-round
    ratios, the share of the CPU other processes took while each child was timed. Each step's thread CPU
    time is kept next to its wall time: on a loaded machine waiting for a core inflates only the wall time.

Writes bench/results/methods_step.md (also printed) and methods_step.json (every number), again after each
round, so that an interrupted run keeps the rounds it finished; --quick writes methods_step_quick.*. "MB" means
MiB. Exit status 1 if a child failed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness import (BENCH_DIR, REPO_ROOT, Runs, Summary, add_output_flags, display_path, driver_parser,
                     finish_args, fmt, machine_facts, paired_ratio, ratio, report_head, round_ratios, run_rounds,
                     spawn_json, summarize, summary_problems, write_result)
from methods_child import FLOOR, MSpec

CHILD = BENCH_DIR / "methods_child.py"
DEFAULT_SWEEP = REPO_ROOT / "experiments" / "methods_minilm.yaml"
REFERENCE = "lora"
SECONDS_PER_CHILD = 40  # a MiniLM child on a 2-core box with a neighbour on one core, for the estimate
# What tells a LoRA-family cell from plain LoRA, for its short label (the sweep names cells by their options).
VARIANT_OPTIONS: dict[str, Any] = {"use_rslora": "rslora", "loraplus_lr_ratio": "lora+",
                                   "init_lora_weights": None}  # None: the option's value is the label


# ------------------------------------------------------------------------- variants


def label_for(settings: Mapping[str, Any]) -> str:
    """A short name for a sweep cell: its method, or what sets it apart from the method's plain form."""
    for option, name in VARIANT_OPTIONS.items():
        if option in settings:
            return str(settings[option]) if name is None else name
    return str(settings.get("method", "lora"))


def variants_from_sweep(path: Path) -> dict[str, dict[str, Any]]:
    """label -> {"cell": the sweep's cell name, "options": its flat `deltatune train` options (seed 0)},
    in the sweep's order; cells that would share a label keep their cell names."""
    from deltatune.sweep.grid import expand, read_spec

    spec = read_spec(path)
    first = {c.name: c for c in expand(spec) if c.seed == spec.seeds[0]}  # one per cell: seeds share options
    labels = [label_for(c.settings) for c in first.values()]
    return {(name if labels.count(label) > 1 else label): {"cell": name, "options": dict(c.options)}
            for label, (name, c) in zip(labels, first.items())}


# -------------------------------------------------------------------------- running


def child_runner(variants: Mapping[str, Mapping[str, Any]], args: argparse.Namespace) -> Any:
    """The callback of one measurement: label -> that variant in a fresh child (the floor uses the
    reference's options: its learning rate and weight decay)."""
    def run(label: str) -> dict[str, Any]:
        options = variants[args.reference if label == FLOOR else label]["options"]
        spec = MSpec(variant=label, options=dict(options), batch=args.batch, seq_len=args.seq_len,
                     quick=args.quick)
        cmd = [sys.executable, str(CHILD), "--spec", json.dumps(asdict(spec)), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        found = spawn_json(cmd)
        return found[0] if not isinstance(found, str) else {"variant": label, "error": found}
    return run


# --------------------------------------------------------------------------- result


def with_cpu(summary: Summary, runs: Runs) -> Summary:
    """harness.summarize's summary plus, per variant, the per-round thread CPU step and others' CPU share."""
    for key, s in summary.items():
        ok = [r for r in runs[key] if "step_s_median" in r]
        if s["status"] == "ok":
            s["cpu_step_s_per_round"] = [r["cpu_step_s_median"] for r in ok]
            s["cpu_step_s"] = statistics.median(s["cpu_step_s_per_round"])
            s["other_cpu_frac_per_round"] = [r["other_cpu_frac"] for r in ok]
            s["other_cpu_frac_median"] = statistics.median((r["other_cpu_frac"] or 0.0) for r in ok)
            s["cpu_per_wall_median"] = statistics.median(r["cpu_per_wall"] for r in ok)
            s["step_s_min"] = min(min(r.get("step_s") or [r["step_s_median"]]) for r in ok)
            s["cpu_step_s_min"] = min(min(r.get("cpu_step_s") or [r["cpu_step_s_median"]]) for r in ok)
            s["method"] = ok[0]["method"]
    return summary


def quartiles(summary: Summary, a: str, b: str, key: str) -> list[float] | None:
    """The first and third quartiles of a's per-round ratios to b's (how much the rounds disagree)."""
    pairs = round_ratios(summary, a, b, key)
    if pairs is None or len(pairs) < 2:
        return [pairs[0], pairs[0]] if pairs else None
    q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
    return [q1, q3]


def figures(summary: Summary, reference: str) -> dict[str, dict[str, Any]]:
    """Per variant: its step against the reference's and the floor's, and its RSS above the floor's."""
    ref, base = summary.get(reference, {}), summary.get(FLOOR, {})
    out = {}
    for key, s in summary.items():
        if s["status"] != "ok":
            out[key] = {"status": s["status"], "reason": s["reason"]}
            continue
        out[key] = {
            "status": "ok", "method": s["method"], "trainable": s["trainable"], "rounds": s["rounds"],
            "step_s": s["step_s"], "cpu_step_s": s["cpu_step_s"], "peak_rss_mb": s["peak_rss_mb"],
            "step_over_ref_of_medians": ratio(s["step_s"], ref.get("step_s")),
            "step_over_ref_per_round": paired_ratio(summary, key, reference),
            "step_over_floor_of_medians": ratio(s["step_s"], base.get("step_s")),
            "step_over_floor_per_round": paired_ratio(summary, key, FLOOR),
            "cpu_step_over_ref_per_round": paired_ratio(summary, key, reference, "cpu_step_s_per_round"),
            "step_over_ref_quartiles": quartiles(summary, key, reference, "step_s_per_round"),
            "cpu_step_over_ref_quartiles": quartiles(summary, key, reference, "cpu_step_s_per_round"),
            "rss_above_floor_mb": s["peak_rss_mb"] - base["peak_rss_mb"] if "peak_rss_mb" in base else None,
            "other_cpu_frac_median": s["other_cpu_frac_median"], "other_cpu_frac_max": s["other_cpu_frac_max"],
            "cpu_per_wall_median": s["cpu_per_wall_median"], "step_s_min": s["step_s_min"],
            "fastest_step_over_ref": ratio(s["step_s_min"], ref.get("step_s_min")),
            "fastest_cpu_step_over_ref": ratio(s["cpu_step_s_min"], ref.get("cpu_step_s_min")),
        }
    return out


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as stored in the JSON and shown in the report."""
    return {"sweep": display_path(args.sweep), "reference": args.reference, "quick": args.quick,
            "batch": args.batch, "seq_len": args.seq_len, "repeats": args.repeats, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "wait_idle_s": args.wait_idle, "only": args.only}


def collect(runs: Runs, variants: Mapping[str, Mapping[str, Any]], args: argparse.Namespace,
            rounds_done: int | None = None) -> dict[str, Any]:
    """The whole result: settings, machine, the cells measured, per variant the summary and figures, the runs."""
    return derived({
        "benchmark": "methods_step", "command": shlex.join(sys.orig_argv),
        "settings": {**settings(args), "rounds_done": args.repeats if rounds_done is None else rounds_done},
        "machine": machine_facts(), "cells": {k: dict(v) for k, v in variants.items() if k in runs}, "runs": runs,
    })


def derived(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` (its runs, settings, machine, cells) with what is computed from its runs (again) added:
    the summary, the figures and the others' CPU share over every child."""
    runs: Runs = result["runs"]
    summary = with_cpu(summarize(runs), runs)
    others = [r["other_cpu_frac"] for results in runs.values() for r in results if r.get("other_cpu_frac") is not None]
    share = {"median": statistics.median(others) if others else None, "max": max(others) if others else None}
    return {**result, "other_cpu_frac": share, "summary": summary,
            "figures": figures(summary, result["settings"]["reference"]), "runs": runs}


# --------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> list[str]:
    """One row per variant: trainable, step and its ratios, CPU-time ratio, memory, neighbours' share."""
    ref = result["settings"]["reference"]
    head = ["method", "trainable", "median step s", f"step / {ref} (medians)", f"step / {ref} (per round)",
            "its quartiles", "step / floor (per round)", "median CPU step s", f"CPU step / {ref} (per round)",
            "its quartiles",
            f"fastest step / {ref}", "peak RSS MB",
            "above floor MB", "CPU / wall", "others' CPU (median, max)", "steps per round s"]
    rows = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, f in result["figures"].items():
        if f["status"] != "ok":
            rows.append(f"| {key} | {f['status']} |" + " |" * (len(head) - 2))
            continue
        per_round = " ".join(f"{x:.3f}" for x in result["summary"][key]["step_s_per_round"])
        cells = [key, f"{f['trainable']:,}", f"{f['step_s']:.3f}", fmt(f["step_over_ref_of_medians"], ".3f"),
                 fmt(f["step_over_ref_per_round"], ".3f"), spread(f["step_over_ref_quartiles"]),
                 fmt(f["step_over_floor_per_round"], ".3f"), f"{f['cpu_step_s']:.3f}",
                 fmt(f["cpu_step_over_ref_per_round"], ".3f"), spread(f["cpu_step_over_ref_quartiles"]),
                 fmt(f["fastest_step_over_ref"], ".3f"), f"{f['peak_rss_mb']:.0f}",
                 fmt(f["rss_above_floor_mb"], ".0f"), f"{f['cpu_per_wall_median']:.2f}",
                 f"{f['other_cpu_frac_median']:.0%}, {f['other_cpu_frac_max']:.0%}", per_round]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def spread(pair: list[float] | None) -> str:
    """Two quartiles as ``q1-q3``."""
    return "n/a" if pair is None else f"{pair[0]:.2f}-{pair[1]:.2f}"


def cell_list(result: dict[str, Any]) -> list[str]:
    """Which sweep cell each label is (its name in the sweep's results)."""
    ref = result["settings"]["reference"]
    return [f"- `{key}`: sweep cell `{c['cell']}`" for key, c in result["cells"].items()] + [
        f"- `floor`: no method; the options of `{ref}` (its lr), the base frozen, the task's new head and pooler (if any) trained, "
        "backward down to the embeddings' output"]


def model_words(settings: Mapping[str, Any]) -> str:
    """The measured model and task, as the sweep's reference cell names them (or the --quick model)."""
    if settings["quick"]:
        return "tiny random BERT (2 layers, hidden 32) + 2-label head"
    options = variants_from_sweep(REPO_ROOT / settings["sweep"])[settings["reference"]]["options"]
    return f"{options.get('model') or 'all-MiniLM-L6-v2'} ({options.get('task', 'seq-cls')})"


def render(result: dict[str, Any]) -> str:
    """The markdown report."""
    m, s, others = result["machine"], result["settings"], result["other_cpu_frac"]
    out = report_head(f"Training step of every method, relative to {s['reference']}", m,
                      "tiny model" if s["quick"] else None)
    out[-1] += f"; python {m['python']}, torch {m['torch']}, transformers {m['transformers']}"
    out += [
        f"- {model_words(s)}, fp32, batch {s['batch']} x {s['seq_len']} tokens (the {s['batch']} longest "
        f"training rows of the sweep's data, cut at {s['seq_len']} tokens, padded to the longest of them), {s['threads']} torch thread(s); each method attached as "
        f"`deltatune train` attaches it for its cell of `{s['sweep']}`; per child 1 checking pass + "
        f"{s['warmup']} warm-up + {s['steps']} timed steps; {s['rounds_done']} of {s['repeats']} interleaved rounds "
        "done (every other one reversed), each child a fresh process",
        "- step: the trainer's loss (with the method's loss terms and signals), backward, AdamW step, the "
        "method's per-step callbacks, zero_grad; no gradient clipping, divergence check or schedule",
        f"- command: `{result['command']}`",
        f"- other processes' share of the machine's CPU while steps were timed: median "
        f"{fmt(others['median'], '.0%')}, max {fmt(others['max'], '.0%')}", "",
        "Median step: median over rounds of each child's median step (wall time). \"per round\": median over "
        "rounds of the ratio of two children of the same round (steadier on a drifting machine); its quartiles: the "
        "first and third quartiles of those per-round ratios, how much the rounds disagree. CPU step: the "
        "same ratio of the step's thread CPU time, which waiting for a core does not inflate; CPU / wall: the "
        "median share of the timed steps' wall time the child spent on a core (1.00: it never waited); fastest step: "
        "the shortest timed step of all rounds over the reference's (the step least slowed by neighbours). Peak RSS: the "
        "child's `ru_maxrss` (every child loads the data, the tokenizer and the model the same way).", "",
        *table(result), "", "## Cells", "", *cell_list(result), "",
        "## Caveats", "",
        "- Measured on a shared machine: the share above is other processes' CPU while steps were timed. "
        "Interleaving and per-round ratios cancel slow spells that last a round, not noise within one; "
        "ratios within about 5% of each other should not be told apart.",
        "- Where CPU / wall is well below 1.00 the child waited for a core during its steps, which inflates wall "
        "time only: then the CPU-time ratio is the better comparison. It is not immune either (neighbours share "
        "the caches and memory bandwidth), so on a loaded machine read both, and rerun on an idle one "
        "(`--wait-idle`) for numbers to quote as speed.",
        "- The timed steps are a run's first ones: AdaLoRA's rank allocation masks only every `deltaT` steps "
        "after `tinit` (10% of the run), so its masking cost is not in these steps; its importance update and "
        "orthogonality loss are.",
        "", "## Problems", "", *(summary_problems(result["summary"], cpu="the machine's CPU") or ["none"]), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --quick changes the defaults of the shape and counts."""
    p = driver_parser(__doc__)
    p.add_argument("--sweep", type=Path, default=DEFAULT_SWEEP, help="the sweep file whose cells to measure")
    p.add_argument("--reference", default=REFERENCE, help=f"the label the ratios divide by (default {REFERENCE})")
    p.add_argument("--only", nargs="+", metavar="LABEL",
                   help="measure only these labels (the floor and the reference always run)")
    p.add_argument("--batch", type=int, help="sequences per batch (default 16; quick 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 64; quick 16)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 5; quick 1)")
    p.add_argument("--steps", type=int, help="timed steps per child (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps after the checking pass (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny random BERT, 1 round, 2 steps: a smoke test")
    add_output_flags(p)
    p.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: remake the report (and the derived figures) of a saved result, with the "
                        "rounds of any further results of the same settings appended to it")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"batch": 2 if q else 16, "seq_len": 16 if q else 64, "repeats": 1 if q else 5, "steps": 2 if q else 5}
    return finish_args(p, args, defaults, ("steps", "repeats", "threads", "batch", "seq_len"))


def chosen(variants: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    """The labels to run: the floor, the reference, then the sweep's others (or those of --only) in order."""
    if args.reference not in variants:
        raise SystemExit(f"--reference {args.reference!r} is not a cell of {display_path(args.sweep)}; "
                         f"labels: {', '.join(variants)}")
    unknown = sorted(set(args.only or ()) - set(variants))
    if unknown:
        raise SystemExit(f"--only {unknown} not in {display_path(args.sweep)}; labels: {', '.join(variants)}")
    rest = [k for k in variants if k != args.reference and (not args.only or k in args.only)]
    return [FLOOR, args.reference, *rest]


def remake(path: Path, more: Sequence[Path] = ()) -> int:
    """Recompute a saved result's figures from its runs, with the rounds of ``more`` results (runs of the
    same settings) appended; rewrite it and its report next to it."""
    result = json.loads(path.read_text())
    for other in (json.loads(p.read_text()) for p in more):
        for key, results in other["runs"].items():
            result["runs"].setdefault(key, []).extend(results)
        result["settings"]["rounds_done"] += other["settings"]["rounds_done"]
        result["settings"]["repeats"] += other["settings"]["repeats"]
        result["command"] = f"{result['command']}; then {other['command']}"
    done = derived(result)
    report, _ = write_result(path.parent, path.stem, done, lambda: render(done))
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, write the report and the JSON."""
    args = parse_args(argv)
    if args.report:
        return remake(args.report[0], args.report[1:])
    variants = variants_from_sweep(args.sweep)
    keys = chosen(variants, args)
    print(f"methods_step: {len(keys) * args.repeats} child processes (about "
          f"{len(keys) * args.repeats * SECONDS_PER_CHILD / 60:.0f} min)", file=sys.stderr)
    stem = "methods_step_quick" if args.quick else "methods_step"

    def write(runs: Runs, rounds_done: int) -> str:
        """The report and JSON of the rounds done so far (an interrupted run keeps them)."""
        result = collect(runs, variants, args, rounds_done)
        report, wrote = write_result(args.out_dir, stem, result, lambda: render(result))
        print(f"wrote {wrote} and .json ({rounds_done} of {args.repeats} rounds)", file=sys.stderr)
        return report

    runs = run_rounds(keys, child_runner(variants, args), args.repeats, args.wait_idle, alternate=True,
                      show_total=True, after_round=write)
    print(write(runs, args.repeats))
    return 1 if any("error" in r for results in runs.values() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
