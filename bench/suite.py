"""Every speed and memory figure of the performance issue, deltatune vs peft, in one command.

What
    Groups of measurements, each a set of variants run side by side (child.py says what a
    variant and a mode are):

    llama        LoRA training step on the 58M LLaMA: floor, peft, deltatune, deltatune-fast
    llama-bf16   the same LoRA step with the base in bf16 (adapters fp32): floor, peft, deltatune
    llama-gc     the same with gradient checkpointing: peft, deltatune (peak RSS above all)
    llama-dora   DoRA training step: peft DoRA, deltatune DoRA, deltatune LoRA
    llama-infer  forward only: base, deltatune unmerged, deltatune merged, peft unmerged
    gpt2         LoRA training step on a 42M GPT-2 (Conv1D layers): floor, peft, deltatune
    minilm       LoRA training step on the real all-MiniLM-L6-v2 with a 2-label head
    qlora        QLoRA step (NF4 + double quantization): deltatune on the fp32 base, deltatune
                 on its 4-bit base, peft on bitsandbytes' 4-bit base (skipped without
                 bitsandbytes; run the suite from an environment that has it)
    sweep-seq    LLaMA step time vs sequence length (batch 4), per --sweep-variants
    sweep-rank   LLaMA step time vs LoRA rank, per --sweep-variants

    and a target table: each figure the issue sets, its limit, the measured ratio, met or not.

Why
    The issue's targets are ratios between variants, and a ratio only means something when
    both sides ran on the same machine, in the same state, under the same settings. So every
    ratio here comes from variants measured in the same run and the same group: each variant
    in a fresh process (peak RSS is its own), interleaved round by round (a slow spell of the
    machine hits every variant alike), medians of medians, plus the median of per-round ratios.

How
    python bench/suite.py                      # everything: ~130 children, 1-1.5 h on 2 cores
    python bench/suite.py --groups llama gpt2  # a subset
    python bench/suite.py --wait-idle 600      # shared machine: wait for quiet before each child
    python bench/suite.py --quick              # tiny models, 1 round, one process: a smoke test

Writes bench/results/suite.md (the report: machine, targets, every group, sweeps with SVG
plots; also printed to stdout) and suite.json (every number); --quick writes suite_quick.*
instead, --out-dir elsewhere.
"MB" means MiB. The exit status is 1 if a child failed or the libraries disagree on the
trainable parameter count; a target not met is a finding, not a failure.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from child import LIBRARY, LORA_KWARGS, LR, NUM_THREADS, Spec
from bounds import BOUND_VARIANTS
from harness import (MALLOC_RETAIN_ENV, BENCH_DIR, Runs, Summary, add_output_flags, driver_parser, finish_args,
                     log_result, machine_facts, paired_ratio, ratio, run_rounds, spawn_json, summarize,
                     wait_for_idle, write_result)
from models import SEED
from suite_report import render, write_plots

CHILD = BENCH_DIR / "child.py"
GROUP_NAMES: tuple[str, ...] = ("llama", "llama-retain", "llama-bf16", "llama-gc", "llama-dora", "llama-infer", "gpt2",
                                "minilm", "qlora", "sweep-seq", "sweep-rank")
SWEEP_VARIANTS: tuple[str, ...] = ("deltatune", "peft", "floor")
SECONDS_PER_CHILD = (30, 40)  # a full-size child on an idle 2-core box, for the estimate


@dataclass(frozen=True)
class Group:
    """Variants measured side by side: their ratios are the only ones the report computes."""

    name: str
    title: str
    members: tuple[tuple[str, Spec], ...]  # (key in tables and ratios, what it measures)
    reference: str | None = None  # key the table divides by, and 'RSS above' subtracts
    sweep: str | None = None  # 'seq_len' or 'rank' for a sweep: the Spec field that varies

    def spec(self, key: str) -> Spec:
        """The Spec of one member."""
        return dict(self.members)[key]


@dataclass(frozen=True)
class Target:
    """One figure of the issue: a / b of ``measure`` in ``group``, at most ``limit``."""

    figure: str
    group: str
    a: str
    b: str
    measure: str  # 'step', 'rss' (peak RSS) or 'rss_above' (peak RSS above the reference)
    limit: float | None  # None: shown for context, no target
    bound: str | None = None  # member that times a's unavoidable work alone (bounds.py)


def trio(arch: str, rss: bool = True) -> tuple[Target, ...]:
    """The three LoRA-step figures the issue asks of every architecture."""
    bound = "bound-floor-lora"
    out = [Target("LoRA step, ours / frozen-base floor", arch, "deltatune", "floor", "step", 1.03,
                  bound),
           Target("LoRA step, ours / peft", arch, "deltatune", "peft", "step", 0.95, bound)]
    if rss:
        out.append(Target("peak RSS above the floor's, ours / peft", arch, "deltatune", "peft",
                          "rss_above", 0.35))
    return tuple(out)


TARGETS: tuple[Target, ...] = (
    *trio("llama"),
    Target("LoRA step, ours with dt.accelerate / peft", "llama", "deltatune-fast", "peft",
           "step", 0.75, "bound-matmuls"),
    Target("peak RSS with gradient checkpointing, ours / peft", "llama-gc", "deltatune", "peft",
           "rss", 1.00),
    Target("DoRA step, ours / our LoRA", "llama-dora", "deltatune-dora", "deltatune-lora",
           "step", 1.10),
    Target("DoRA step, ours / peft DoRA", "llama-dora", "deltatune-dora", "peft-dora", "step", 0.85),
    Target("unmerged LoRA forward / base forward", "llama-infer", "deltatune", "base", "step", 1.05,
           "bound-floor-lora"),
    Target("merged LoRA forward / base forward", "llama-infer", "deltatune-merged", "base",
           "step", 1.01),
    *trio("gpt2"),
    *trio("minilm"),
    Target("QLoRA step, ours / our LoRA on the fp32 base", "qlora", "deltatune-qlora",
           "deltatune", "step", 1.30),
    Target("QLoRA step, ours / peft + bitsandbytes", "qlora", "deltatune-qlora", "peft-qlora",
           "step", 1.00),
    Target("QLoRA peak RSS, ours / peft + bitsandbytes", "qlora", "deltatune-qlora", "peft-qlora",
           "rss", 1.00),
)
CONTEXT: tuple[Target, ...] = (  # no target: what the targets should be read next to
    Target("LoRA step, peft / floor", "llama", "peft", "floor", "step", None),
    Target("retained memory: LoRA step, ours / floor", "llama-retain", "deltatune", "floor", "step",
           None),
    Target("retained memory: LoRA step, ours / peft", "llama-retain", "deltatune", "peft", "step",
           None),
    Target("retained memory: LoRA step, ours with dt.accelerate / peft", "llama-retain",
           "deltatune-fast", "peft", "step", None),
    Target("retained memory: peak RSS above the floor's, ours / peft", "llama-retain", "deltatune",
           "peft", "rss_above", None),
    Target("bf16 base: LoRA step, ours / floor", "llama-bf16", "deltatune", "floor", "step", None),
    Target("bf16 base: LoRA step, peft / floor", "llama-bf16", "peft", "floor", "step", None),
    Target("bf16 base: LoRA step, ours / peft", "llama-bf16", "deltatune", "peft", "step", None),
    Target("bf16 base: peak RSS above the floor's, ours / peft", "llama-bf16", "deltatune", "peft",
           "rss_above", None),
    Target("peak RSS, ours / peft", "llama", "deltatune", "peft", "rss", None),
    Target("peak RSS above the floor's, ours with dt.accelerate / peft", "llama", "deltatune-fast",
           "peft", "rss_above", None),
    Target("LoRA step with gradient checkpointing, ours / peft", "llama-gc", "deltatune", "peft",
           "step", None),
    Target("DoRA peak RSS, ours / peft DoRA", "llama-dora", "deltatune-dora", "peft-dora", "rss",
           None),
    Target("unmerged LoRA forward, peft / base", "llama-infer", "peft", "base", "step", None),
    Target("unmerged LoRA forward, ours / peft", "llama-infer", "deltatune", "peft", "step", None),
    Target("LoRA step, peft / floor", "gpt2", "peft", "floor", "step", None),
    Target("LoRA step, ours with dt.accelerate / peft", "gpt2", "deltatune-fast", "peft", "step",
           None),
    Target("LoRA step, ours with dt.accelerate / floor", "gpt2", "deltatune-fast", "floor", "step",
           None),
    Target("LoRA step, peft / floor", "minilm", "peft", "floor", "step", None),
)


# --------------------------------------------------------------------------- groups


def side_by_side(name: str, title: str, base: Spec, variants: Sequence[tuple[str, dict[str, Any]]],
                 reference: str | None) -> Group:
    """A group of ``base`` with each (key, Spec changes) applied."""
    return Group(name, title, tuple((k, replace(base, **chg)) for k, chg in variants), reference)


def sweep(name: str, title: str, base: Spec, field: str, values: Sequence[int],
          variants: Sequence[str]) -> Group:
    """Every variant at every value of ``field`` (floor left out of a rank sweep: no rank)."""
    keep = [v for v in variants if not (field == "rank" and LIBRARY[v] is None)]
    changes: list[tuple[str, dict[str, Any]]] = [
        (f"{v}@{'r' if field == 'rank' else ''}{x}", {"variant": v, field: x})
        for x in values for v in keep]
    members = tuple((key, replace(base, **chg)) for key, chg in changes)
    return Group(name, title, members, sweep=field)


def all_groups(quick: bool, seq_lens: Sequence[int], ranks: Sequence[int],
               sweep_variants: Sequence[str]) -> list[Group]:
    """Every group of the suite, in the order they run."""
    train = Spec(arch="llama", mode="train", quick=quick)
    lora = [("floor", {"variant": "floor"}), ("peft", {"variant": "peft"}),
            ("deltatune", {"variant": "deltatune"})]
    fast = ("deltatune-fast", {"variant": "deltatune-fast"})
    bound_floor_lora = ("bound-floor-lora", {"variant": "bound-floor-lora"})
    return [
        side_by_side("llama", "LoRA training step, LLaMA", train,
                     [*lora, fast, *[(v, {"variant": v}) for v in BOUND_VARIANTS]], "floor"),
        side_by_side("llama-retain", "LoRA training step, LLaMA, every variant with glibc keeping "
                     "freed memory (dt.retain_freed_memory's setting)", replace(train, malloc="retain"),
                     [*lora, fast], "floor"),
        side_by_side("llama-bf16", "LoRA training step, LLaMA in bf16 (fp32 adapters)",
                     replace(train, dtype="bfloat16"), lora, "floor"),
        side_by_side("llama-gc", "LoRA training step with gradient checkpointing, LLaMA",
                     replace(train, mode="train-gc"),
                     [("peft", {"variant": "peft"}), ("deltatune", {"variant": "deltatune"})], None),
        side_by_side("llama-dora", "DoRA training step, LLaMA", train,
                     [("peft-dora", {"variant": "peft", "dora": True}),
                      ("deltatune-dora", {"variant": "deltatune", "dora": True}),
                      ("deltatune-lora", {"variant": "deltatune"})], "deltatune-lora"),
        side_by_side("llama-infer", "Inference forward (no autograd), LLaMA",
                     replace(train, mode="infer"),
                     [(v, {"variant": v}) for v in ("base", "deltatune", "deltatune-merged", "peft",
                                                    "bound-floor-lora")],
                     "base"),
        side_by_side("gpt2", "LoRA training step, GPT-2 (Conv1D)", replace(train, arch="gpt2"),
                     [*lora, fast, bound_floor_lora],
                     "floor"),
        side_by_side("minilm", "LoRA training step, all-MiniLM-L6-v2 sequence classification",
                     replace(train, arch="minilm"), [*lora, bound_floor_lora], "floor"),
        side_by_side("qlora", "QLoRA training step (NF4, double quantization), LLaMA", train,
                     [("deltatune", {"variant": "deltatune"}),
                      ("deltatune-qlora", {"variant": "deltatune-qlora"}),
                      ("peft-qlora", {"variant": "peft-qlora"})], "deltatune"),
        sweep("sweep-seq", "LoRA step time vs sequence length, LLaMA", train, "seq_len", seq_lens,
              sweep_variants),
        sweep("sweep-rank", "LoRA step time vs rank, LLaMA", train, "rank", ranks, sweep_variants),
    ]


# -------------------------------------------------------------------------- running


def spawn_specs(specs: Sequence[Spec], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``specs`` one after the other in one fresh child; one result per spec."""
    cmd = [sys.executable, str(CHILD), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    for spec in specs:
        cmd += ["--spec", json.dumps(asdict(spec))]
    mallocs = {spec.malloc for spec in specs}
    if len(mallocs) > 1:
        raise ValueError(f"specs of one child must share its malloc setting, got {sorted(mallocs)}")
    found = spawn_json(cmd, MALLOC_RETAIN_ENV if mallocs == {"retain"} else None)
    if isinstance(found, str) or len(found) != len(specs):
        why = found if isinstance(found, str) else f"child printed {len(found)} of {len(specs)} results"
        return [{"variant": s.variant, "spec": asdict(s), "error": why} for s in specs]
    return found


def repeats_of(group: Group, args: argparse.Namespace) -> int:
    """Rounds of a group: --sweep-repeats for sweeps, --repeats otherwise."""
    return int(args.sweep_repeats if group.sweep else args.repeats)


def member_runner(group: Group, args: argparse.Namespace) -> Callable[[str], dict[str, Any]]:
    """run_rounds' callback for one group: one member in a fresh child."""
    def run(key: str) -> dict[str, Any]:
        return spawn_specs([group.spec(key)], args)[0]
    return run


def run_fresh(groups: Sequence[Group], args: argparse.Namespace) -> dict[str, Runs]:
    """Each group in turn, interleaved rounds, one fresh process per child (the real thing)."""
    out: dict[str, Runs] = {}
    for g in groups:
        print(f"== {g.name}: {g.title} (rounds: {repeats_of(g, args)})", file=sys.stderr)
        out[g.name] = run_rounds([k for k, _ in g.members], member_runner(g, args),
                                 repeats_of(g, args), args.wait_idle, prefix=f"{g.name} ")
    return out


def run_shared(groups: Sequence[Group], args: argparse.Namespace) -> dict[str, Runs]:
    """All children of a round in one process (the smoke test: interpreter start-ups cost
    several seconds each). Peak RSS is then cumulative and means nothing, and a variant that
    changes global state would reach the ones after it: never use this for real numbers."""
    out: dict[str, Runs] = {g.name: {k: [] for k, _ in g.members} for g in groups}
    dropped: set[tuple[str, str]] = set()
    for rnd in range(1, max(repeats_of(g, args) for g in groups) + 1):
        todo = [(g.name, k, s) for g in groups if rnd <= repeats_of(g, args)
                for k, s in g.members if (g.name, k) not in dropped]
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        for (name, key, _), res in spawn_by_malloc(todo, args):
            out[name][key].append(res)
            log_result(f"[{name} round {rnd}]", key, res)
            if "skipped" in res or "error" in res:
                dropped.add((name, key))
    return out


def spawn_by_malloc(todo: list[tuple[str, str, Spec]],
                    args: argparse.Namespace) -> list[tuple[tuple[str, str, Spec], dict[str, Any]]]:
    """spawn_specs for a round's members, one child per malloc setting (it is the child's
    environment); results paired with their members."""
    out: list[tuple[tuple[str, str, Spec], dict[str, Any]]] = []
    for malloc in sorted({spec.malloc for _, _, spec in todo}):
        batch = [member for member in todo if member[2].malloc == malloc]
        out += zip(batch, spawn_specs([spec for _, _, spec in batch], args))
    return out


# --------------------------------------------------------------------------- ratios


def per_round(summary: Summary, key: str, measure: str, ref: str | None) -> list[float] | None:
    """One member's value in each round: step s, peak RSS, or peak RSS above ``ref``'s."""
    s = summary.get(key, {})
    if measure == "step":
        return s.get("step_s_per_round")
    rss = s.get("peak_rss_mb_per_round")
    if measure == "rss" or rss is None:
        return rss
    ref_rss = summary.get(ref or "", {}).get("peak_rss_mb_per_round")
    return None if ref_rss is None else [x - f for x, f in zip(rss, ref_rss)]


def median_of(values: list[float] | None) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def evaluate(target: Target, groups: dict[str, Group], summaries: dict[str, Summary],
             shared_process: bool = False) -> dict[str, Any]:
    """A target's measured value (ratio of medians), median of per-round ratios, and verdict
    (none for memory when children shared a process: their peak RSS is not their own)."""
    row: dict[str, Any] = {**asdict(target), "value": None, "per_round": None, "verdict": "n/a",
                           "bound_value": None}
    if target.group not in summaries:
        return {**row, "verdict": "not run"}
    summary, ref = summaries[target.group], groups[target.group].reference
    if target.measure == "step":
        row["value"] = ratio(summary.get(target.a, {}).get("step_s"),
                             summary.get(target.b, {}).get("step_s"))
        row["per_round"] = paired_ratio(summary, target.a, target.b)
        if target.bound:
            row["bound_value"] = ratio(summary.get(target.bound, {}).get("step_s"),
                                       summary.get(target.b, {}).get("step_s"))
    else:
        a = per_round(summary, target.a, target.measure, ref)
        b = per_round(summary, target.b, target.measure, ref)
        row["value"] = ratio(median_of(a), median_of(b))
        pairs = [x / y for x, y in zip(a or [], b or []) if y]
        row["per_round"] = median_of(pairs)
    if shared_process and target.measure != "step":
        row["verdict"] = "n/a (shared process)"
    elif row["value"] is not None and target.limit is not None:
        row["verdict"] = "met" if row["value"] <= target.limit else "not met"
    return row


# --------------------------------------------------------------------------- checks


def trainable_mismatches(group: Group, summary: Summary) -> list[str]:
    """peft and deltatune members with the same spec must train the same number of params."""
    out = []
    for key, spec in group.members:
        twin = next((k for k, s in group.members
                     if s == replace(spec, variant="deltatune")), None) if spec.variant == "peft" else None
        pe, dt = summary.get(key, {}), summary.get(twin or "", {})
        if twin and pe.get("status") == dt.get("status") == "ok" and pe["trainable"] != dt["trainable"]:
            out.append(f"{group.name}: trainable params {key} {pe['trainable']:,} != "
                       f"{twin} {dt['trainable']:,}")
    return out


def first_values(group: Group, runs: Runs) -> dict[str, float]:
    """What must agree across a group's members: the first-step loss when training (LoRA B
    starts at zero, so every variant computes the stock model's loss), the mean |logit| of the
    adapted members when inferring (merged and unmerged compute the same function)."""
    out: dict[str, float] = {}
    for key, spec in group.members:
        ok = [r for r in runs.get(key, []) if "step_s_median" in r]
        if not ok or (not spec.training and LIBRARY[spec.variant] is None):
            continue
        value = ok[0]["loss_first"] if spec.training else ok[0]["logits_abs_mean"]
        if value is not None:
            out[key] = value
    return out


def disagreements(group: Group, values: dict[str, float], rel_tol: float = 1e-4) -> list[str]:
    """A note per set of members that must agree and do not (within ``rel_tol``): members
    agree when they share model, batch, mode and base precision (rank and DoRA do not change the
    first loss; the two 4-bit bases are bit-identical, so they agree with each other)."""
    sets: dict[tuple[Any, ...], dict[str, float]] = {}
    for key, value in values.items():
        spec = group.spec(key)
        four_bit = spec.variant.endswith("-qlora")
        sets.setdefault((spec.arch, spec.mode, spec.seq_len, spec.quick, spec.dtype, four_bit), {})[key] = value
    out = []
    for same in sets.values():
        lo, hi = min(same.values()), max(same.values())
        if hi - lo > rel_tol * max(abs(hi), abs(lo), 1e-12):
            out.append(f"{group.name}: values that must agree differ: "
                       + ", ".join(f"{k} {v:.6f}" for k, v in same.items()))
    return out


# ---------------------------------------------------------------------------- main


def planned_children(groups: Sequence[Group], args: argparse.Namespace) -> int:
    """How many children the run will start (fewer if variants skip)."""
    if args.one_process:
        return max(repeats_of(g, args) for g in groups)
    return sum(len(g.members) * repeats_of(g, args) for g in groups)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as stored in the JSON and shown in the report."""
    return {"quick": args.quick, "groups": args.groups, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "sweep_repeats": args.sweep_repeats,
            "seq_lens": args.seq_lens, "ranks": args.ranks, "sweep_variants": args.sweep_variants,
            "one_process": args.one_process, "wait_idle_s": args.wait_idle, "lora": LORA_KWARGS,
            "lr": LR, "threads": args.threads, "seed": SEED, "dtype": "float32 (llama-bf16: bfloat16 base)"}


def collect(groups: Sequence[Group], runs: dict[str, Runs], args: argparse.Namespace) -> dict[str, Any]:
    """The whole result: settings, machine, per group its specs/summary/checks/runs, targets."""
    by_name = {g.name: g for g in groups}
    summaries = {g.name: summarize(runs[g.name]) for g in groups}
    result: dict[str, Any] = {
        "benchmark": "suite", "command": shlex.join(sys.orig_argv), "settings": settings(args),
        "machine": machine_facts(), "groups": {}, "targets": [], "context": [],
    }
    for g in groups:
        agree = first_values(g, runs[g.name])
        result["groups"][g.name] = {
            "title": g.title, "reference": g.reference, "sweep": g.sweep,
            "specs": {k: asdict(s) for k, s in g.members}, "summary": summaries[g.name],
            "trainable_mismatches": trainable_mismatches(g, summaries[g.name]),
            "first_values": agree, "disagreements": disagreements(g, agree), "runs": runs[g.name],
        }
    for field, targets in (("targets", TARGETS), ("context", CONTEXT)):
        result[field] = [evaluate(t, by_name, summaries, args.one_process)
                         for t in targets if t.group in by_name]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --quick changes the defaults of the counts and sweep points."""
    p = driver_parser(__doc__)
    p.add_argument("--groups", nargs="+", choices=GROUP_NAMES, default=list(GROUP_NAMES),
                   help="groups to run (default: all)")
    p.add_argument("--repeats", type=int, help="interleaved rounds per group (default 5; quick 1)")
    p.add_argument("--sweep-repeats", type=int, help="rounds per sweep (default 2; quick 1)")
    p.add_argument("--steps", type=int, help="timed steps per child (default 6; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default 2; quick 1)")
    p.add_argument("--seq-lens", type=int, nargs="+",
                   help="sweep-seq points (default 128 256 512 1024; quick 16 32 64)")
    p.add_argument("--ranks", type=int, nargs="+",
                   help="sweep-rank points (default 4 8 16 32 64; quick 4 16 64)")
    p.add_argument("--sweep-variants", nargs="+", choices=SWEEP_VARIANTS,
                   default=["deltatune", "peft"], help="variants of the sweeps (default: deltatune peft)")
    p.add_argument("--threads", type=int,
                   help=f"torch threads per child (default {NUM_THREADS}; quick 1: tiny ops on "
                        "2 threads crawl when a neighbour holds a core)")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, 1 round, 2 steps, 1 thread, all in one process: a smoke test")
    p.add_argument("--one-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run all children of a round in one process (default: only with --quick); "
                        "faster, but peak RSS is then cumulative")
    add_output_flags(p, "where suite.md/.json and the plots go (default bench/results)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"repeats": 1 if q else 5, "sweep_repeats": 1 if q else 2, "steps": 2 if q else 6,
                "warmup": 1 if q else 2, "seq_lens": [16, 32, 64] if q else [128, 256, 512, 1024],
                "ranks": [4, 16, 64] if q else [4, 8, 16, 32, 64], "one_process": q,
                "threads": 1 if q else NUM_THREADS}
    return finish_args(p, args, defaults, ("steps", "repeats", "sweep_repeats", "threads"))


def main(argv: list[str] | None = None) -> int:
    """Run the selected groups, write the report, the JSON and the plots."""
    args = parse_args(argv)
    groups = [g for g in all_groups(args.quick, args.seq_lens, args.ranks, args.sweep_variants)
              if g.name in args.groups]
    n = planned_children(groups, args)
    lo, hi = (n * s / 60 for s in SECONDS_PER_CHILD)
    print(f"suite: {len(groups)} groups, {n} child processes"
          + ("" if args.quick else f" (about {lo:.0f}-{hi:.0f} min at full size)"), file=sys.stderr)
    runs = (run_shared if args.one_process else run_fresh)(groups, args)
    result = collect(groups, runs, args)

    stem = "suite_quick" if args.quick else "suite"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(result, args.out_dir, stem)
    report, wrote = write_result(args.out_dir, stem, result, lambda: render(result, plots))
    print(report)
    print(f"wrote {wrote} and .json", file=sys.stderr)
    failed = any("error" in r for g in runs.values() for rs in g.values() for r in rs)
    mismatch = any(g["trainable_mismatches"] for g in result["groups"].values())
    return 1 if failed or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
