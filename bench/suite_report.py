"""The suite's markdown report and sweep plots, made from its JSON result alone.

Why from the JSON only: the report must show exactly the numbers that were stored, and the
plots and tables can be remade from a kept suite.json without measuring again.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import fmt, summary_problems
from models import shape_for

Points = dict[str, list[tuple[float, float]]]  # variant -> (x, median step s)


# ---------------------------------------------------------------------------- sweeps


def sweep_points(group: dict[str, Any]) -> Points:
    """Per variant, (swept value, median step s) of every member that ran."""
    points: Points = {}
    for key, spec in group["specs"].items():
        s = group["summary"].get(key, {})
        if s.get("status") == "ok":
            points.setdefault(spec["variant"], []).append((spec[group["sweep"]], s["step_s"]))
    return {v: sorted(p) for v, p in points.items()}


def line_plot(series: Mapping[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
              path: Path) -> None:
    """One line per series, with a dot at each measured point, written as SVG by matplotlib (the
    `plot` extra). Both axes start at 0, so a cost proportional to x reads as a straight line
    aimed at the origin, and a flat cost reads as flat."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    axes.set(title=title, xlabel=x_label, ylabel=y_label, xlim=(0, None), ylim=(0, None))
    axes.set_xticks(sorted({x for points in series.values() for x, _ in points} | {0}))
    axes.grid(axis="y", color="#ddd")
    axes.legend(loc="lower right")
    figure.tight_layout()
    # text as text (searchable, small); no creation date and a fixed id salt: remaking a plot from
    # the same JSON gives the same file
    with matplotlib.rc_context({"svg.hashsalt": "deltatune", "svg.fonttype": "none"}):
        figure.savefig(path, format="svg", metadata={"Date": None})
    plt.close(figure)


def write_plots(result: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """One SVG per sweep group that has points; returns group name -> file name."""
    axis = {"seq_len": "sequence length (tokens, batch fixed)", "rank": "LoRA rank r"}
    files: dict[str, str] = {}
    for name, group in result["groups"].items():
        points = sweep_points(group) if group["sweep"] else {}
        if not points:
            continue
        files[name] = f"{stem}_{name.replace('-', '_')}.svg"
        line_plot(points, group["title"], axis[group["sweep"]], "median step time (s)", out_dir / files[name])
    return files


def sweep_table(group: dict[str, Any]) -> list[str]:
    """Rows of a sweep: step s per variant, with per-1k-token cost (seq_len) or the step
    relative to the smallest rank (rank), and deltatune/peft where both ran."""
    points, field = sweep_points(group), group["sweep"]
    variants = list(points)
    extra = "ms per 1k tokens" if field == "seq_len" else "/ smallest rank"
    head = [field] + [f"{v} step s | {v} {extra}" for v in variants]
    both = {"deltatune", "peft"} <= set(variants)
    rows = ["| " + " | ".join(head + (["deltatune / peft"] if both else [])) + " |",
            "|---" + "|---:" * (2 * len(variants) + both) + "|"]
    spec0 = next(iter(group["specs"].values()))
    for x in sorted({x for p in points.values() for x, _ in p}):
        got = {v: dict(p).get(x) for v, p in points.items()}
        cells = [str(x)]
        for v in variants:
            step = got[v]
            if field == "seq_len":
                tokens = shape_for(spec0["arch"], spec0["quick"], int(x)).batch * x
                rel = None if step is None else step / tokens * 1e6
            else:
                rel = None if step is None else step / points[v][0][1]
            cells += [fmt(step, ".3f"), fmt(rel, ".3f" if field == "rank" else ".2f")]
        if both:
            d, p = got["deltatune"], got["peft"]
            cells.append(fmt(None if d is None or not p else d / p, ".3f"))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


# ---------------------------------------------------------------------------- tables


def describe(spec: dict[str, Any], lora: dict[str, Any]) -> str:
    """One line saying what a group's members share: model, batch, mode, adapter."""
    shape = shape_for(spec["arch"], spec["quick"], spec["seq_len"])
    model = (f"hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, "
             f"vocab {shape.vocab_size}")
    adapter = (f"r={spec['rank']} alpha={2 * spec['rank']} dropout {lora['lora_dropout']} on "
               f"{lora['target_modules']}" + (" except the classifier" if spec["arch"] == "minilm" else ""))
    dtype = spec.get("dtype", "float32")
    return (f"{spec['arch']} ({model}{'' if dtype == 'float32' else ', ' + dtype}), batch "
            f"{shape.batch} x {shape.seq_len} tokens, mode {spec['mode']}, {adapter}")


def group_table(group: dict[str, Any]) -> list[str]:
    """Per member: median step, peak RSS, both against the reference (if the group has one),
    and the value that must agree across members."""
    summary, ref_key = group["summary"], group["reference"]
    ref = summary.get(ref_key or "", {})
    agree = group["first_values"]
    vs = [f"step / {ref_key}", f"RSS above {ref_key} MB"] if ref_key else []
    head = ["variant", "median step s", "peak RSS MB", *vs, "rounds", "trainable",
            "first loss or mean abs logit"]
    rows = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, s in summary.items():
        if s["status"] != "ok":
            rows.append(f"| {key} | {s['status']} |" + " |" * (len(head) - 2))
            continue
        cells = [key, f"{s['step_s']:.3f}", f"{s['peak_rss_mb']:.0f}"]
        if ref_key:
            cells += [fmt(s["step_s"] / ref["step_s"] if "step_s" in ref else None, ".3f"),
                      fmt(s["peak_rss_mb"] - ref["peak_rss_mb"] if "peak_rss_mb" in ref else None, ".0f")]
        cells += [str(s["rounds"]), f"{s['trainable']:,}", fmt(agree.get(key), ".6f")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def target_table(rows: list[dict[str, Any]], with_limit: bool) -> list[str]:
    """The figures: measured ratio of medians, median of per-round ratios, the verdict, and
    (targets only) the best this machine allows: the bound member's time in ``a``'s place."""
    head = "| figure | group | " + ("target | " if with_limit else "")
    out = [head + "ratio of medians | median of per-round ratios |"
           + (" verdict | bound |" if with_limit else ""),
           "|---|---|" + ("---:|" if with_limit else "") + "---:|---:|" + ("---|---:|" if with_limit else "")]
    for r in rows:
        limit = f"<= {r['limit']:.2f} | " if with_limit else ""
        bound = f" {fmt(r.get('bound_value'), '.3f')} ({r['bound']})" if r.get("bound") else " "
        verdict = f" {r['verdict']} |{bound} |" if with_limit else ""
        out.append(f"| {r['figure']} ({r['a']} / {r['b']}) | {r['group']} | {limit}"
                   f"{fmt(r['value'], '.3f')} | {fmt(r['per_round'], '.3f')} |{verdict}")
    return out


# ---------------------------------------------------------------------------- report


def header(result: dict[str, Any]) -> list[str]:
    """Title, the smoke-test caveat, machine facts and settings."""
    m, s = result["machine"], result["settings"]
    out = ["# deltatune speed and memory suite", ""]
    if s["quick"]:
        out += ["**Quick smoke run** (tiny models, one round, all children in one process): "
                "these numbers test the harness and mean nothing about performance.", ""]
    out += [
        f"- date: {m['date']}; git commit: {m['git_commit']}",
        f"- CPU: {m['cpu_model'] or m['processor'] or m['machine']}; cores {m['nproc']} "
        f"(usable {m['nproc_affinity']}); memory {fmt(m['mem_gib'], '.1f')} GiB; {m['platform']}",
        f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, bitsandbytes {m.get('bitsandbytes') or 'not installed'}, "
        f"deltatune {m['deltatune']}",
        f"- {s['threads']} torch threads, {s['dtype']}, AdamW lr {s['lr']}; per child "
        f"{s['warmup']} warm-up + {s['steps']} timed steps; interleaved rounds: {s['repeats']} "
        f"per group, {s['sweep_repeats']} per sweep; "
        + ("all children of a round in one process (peak RSS cumulative)" if s["one_process"]
           else "each child a fresh process"),
        f"- command: `{result['command']}`", "",
        "Step time is the median over rounds of each child's median step; peak RSS is the "
        "child's `ru_maxrss` (MB = MiB). Ratios are between variants of the same group in this "
        "run; the verdict uses the ratio of medians, the median of per-round ratios (steadier "
        "when the machine drifts) is shown next to it.", "",
    ]
    return out


def problems(result: dict[str, Any]) -> list[str]:
    """Skipped and failed variants, disagreements and noisy timings, one bullet each."""
    out = []
    for name, g in result["groups"].items():
        out += summary_problems(g["summary"], f"{name} / ")
        out += [f"- {m}" for m in g["trainable_mismatches"]]
        out += [f"- {m}" for m in g["disagreements"]]
    return out


def render(result: dict[str, Any], plots: dict[str, str]) -> str:
    """The whole markdown report."""
    targets = result["targets"]
    met = sum(r["verdict"] == "met" for r in targets)
    measured = sum(r["verdict"] in ("met", "not met") for r in targets)
    out = header(result)
    out += ["## Targets", "", f"{met} of {measured} measured targets met "
            f"({len(targets) - measured} without a verdict: a variant skipped, failed or not run, "
            "or memory measured in a shared process).", ""]
    out += target_table(targets, with_limit=True) + [""]
    out += ["*bound*: the same ratio with, in the numerator's place, a step that does only the "
            "work the numerator cannot avoid (bench/bounds.py): `bound-floor-lora` is the floor's "
            "step plus the LoRA matrix products and AdamW timed alone (the best the LoRA path can "
            "reach without making the frozen base cheaper); `bound-matmuls` is every matrix "
            "product of a LoRA step and nothing else, outputs preallocated (no fp32 step can beat "
            "it with this GEMM library). A target below its bound is out of reach on this machine.",
            ""]
    if result["context"]:
        out += ["Context (no target):", ""] + target_table(result["context"], with_limit=False) + [""]
    for name, g in result["groups"].items():
        spec0 = next(iter(g["specs"].values()))
        varies = f"; {g['sweep']} varies" if g["sweep"] else ""
        out += [f"## {name}: {g['title']}", "", describe(spec0, result["settings"]["lora"]) + varies, ""]
        if g["sweep"]:
            out += sweep_table(g) + [""]
            if name in plots:
                out += [f"![{g['title']}]({plots[name]})", ""]
        else:
            out += group_table(g) + [""]
    found = problems(result)
    out += ["## Problems", ""] + (found or ["none"]) + [""]
    return "\n".join(out)
