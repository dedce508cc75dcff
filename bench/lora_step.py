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

The markdown table goes to stdout, the full result (all step times, machine facts,
the command line) to ``--out`` as JSON (default bench/results/lora_step.json, or
lora_step_quick.json with --quick; dora_step.json / dora_step_quick.json with
--dora). "MB" means MiB (2**20 bytes). The exit status
is 1 if deltatune and peft disagree on the trainable parameter count or a child fails.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT_VARIANTS: tuple[str, ...] = ("floor", "peft", "deltatune")
VARIANTS: tuple[str, ...] = (*DEFAULT_VARIANTS, "deltatune-lora", "deltatune-qlora")
# The adapter library behind each variant (None: no adapter).
LIBRARY: dict[str, str | None] = {
    "floor": None, "peft": "peft", "deltatune": "deltatune", "deltatune-lora": "deltatune",
    "deltatune-qlora": "deltatune",
}
PLAIN_LORA_VARIANTS = frozenset({"deltatune-lora", "deltatune-qlora"})  # stay LoRA under --dora
QUANTIZED_VARIANTS = frozenset({"deltatune-qlora"})  # base linear layers in NF4 (double quant) first
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

SEED = 0
NUM_THREADS = 2
LR = 1e-4
NOISY_CPU_FRAC = 0.05  # warn when neighbours take more than this share of the CPU
LORA_KWARGS: dict[str, Any] = dict(
    r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"
)


@dataclass(frozen=True)
class Shape:
    """Model and batch size of one benchmark setting."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    batch: int
    seq_len: int


FULL = Shape(512, 8, 8, 1408, 32000, batch=4, seq_len=256)
QUICK = Shape(64, 2, 4, 176, 1000, batch=2, seq_len=32)


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
    return {**LORA_KWARGS, **({"use_dora": True} if uses_dora(variant, dora) else {})}


def label(variant: str, dora: bool) -> str:
    """Name in the table and ratios: the variant itself, or 'peft DoRA' etc. with --dora."""
    if not dora or LIBRARY[variant] is None:
        return variant
    return f"{LIBRARY[variant]} {'DoRA' if uses_dora(variant, dora) else 'LoRA'}"


# --------------------------------------------------------------------------- child


class SkipVariant(Exception):
    """The variant cannot run here (e.g. deltatune is not importable yet)."""


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def system_busy_s() -> float | None:
    """CPU seconds all processes on the machine have spent busy, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal, not guest


def build_model(shape: Shape) -> Any:
    """A random-init LlamaForCausalLM in fp32, identical in every child (fixed seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        use_cache=False,  # training: no KV cache to allocate
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    return model


def make_batch(shape: Shape) -> Any:
    """Random token ids, drawn from their own generator so every variant sees the same."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=gen)


def import_deltatune() -> ModuleType | str:
    """deltatune from this checkout's src/ (else the installed one), or why it is unusable."""
    src = REPO_ROOT / "src"
    if (src / "deltatune" / "__init__.py").is_file():
        sys.path.insert(0, str(src))
    try:
        import deltatune as dt
    except Exception as exc:  # ImportError, or any error raised while importing
        return f"`import deltatune` failed: {type(exc).__name__}: {exc}"
    missing = [n for n in ("attach", "LoraConfig", "trainable_parameters") if not hasattr(dt, n)]
    if missing:
        return f"deltatune ({getattr(dt, '__file__', None)}) lacks {', '.join(missing)}"
    return dt


def import_library(variant: str) -> ModuleType | None:
    """The adapter library this variant uses (None for floor); raise SkipVariant if unusable."""
    if variant not in LIBRARY:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if LIBRARY[variant] is None:
        return None
    if LIBRARY[variant] == "peft":
        import peft

        return peft
    dt = import_deltatune()
    if isinstance(dt, str):
        raise SkipVariant(dt)
    return dt


def prepare(variant: str, lib: ModuleType | None, model: Any,
            dora: bool) -> tuple[Any, dict[str, Any]]:
    """Apply the variant to ``model``; return the model to train and the library's own facts."""
    facts: dict[str, Any] = {}
    kwargs = adapter_kwargs(variant, dora)
    if LIBRARY[variant] is None:
        for p in model.parameters():
            p.requires_grad_(False)
        # Make the embedding output a leaf that wants grad, so backward runs through
        # every layer down to the embeddings (what HF's enable_input_require_grads does).
        model.get_input_embeddings().register_forward_hook(
            lambda _mod, _inp, out: out.requires_grad_(True)
        )
    elif LIBRARY[variant] == "peft":
        peft = lib
        model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        trainable, total = model.get_nb_trainable_parameters()
        facts.update(lib_trainable=trainable, lib_total=total, lib_version=peft.__version__)
    elif LIBRARY[variant] == "deltatune":
        dt = lib
        if variant in QUANTIZED_VARIANTS:  # QLoRA: same LoRA, on a 4-bit base (lm_head stays dense)
            dt.quantize(model, dt.QuantConfig(quant_type="nf4", double_quant=True))
        model = dt.attach(model, dt.LoraConfig(**kwargs), name="default")
        trainable, total = dt.trainable_parameters(model)
        facts.update(
            lib_trainable=trainable,
            lib_total=total,
            lib_version=getattr(dt, "__version__", None),
            lib_file=display_path(Path(dt.__file__)) if getattr(dt, "__file__", None) else None,
        )
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return model, facts


def train_step(model: Any, batch: Any, optimizer: Any | None) -> float:
    """One step: forward, causal-LM loss (labels = inputs), backward, AdamW, zero_grad."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def check_grads(model: Any, batch: Any) -> int:
    """Run forward+backward once; return how many trainable params got no gradient."""
    model(input_ids=batch, labels=batch).loss.backward()
    missing = sum(1 for p in model.parameters() if p.requires_grad and p.grad is None)
    model.zero_grad(set_to_none=True)
    return missing


def run_child(variant: str, shape: Shape, steps: int, warmup: int,
              dora: bool = False) -> dict[str, Any]:
    """Build, warm up, and time one variant in this process; return its measurements."""
    import torch

    torch.set_num_threads(NUM_THREADS)
    import transformers  # noqa: F401  (every variant pays for it; keep it out of import_s)

    t0 = time.perf_counter()
    try:
        lib = import_library(variant)
    except SkipVariant as exc:
        return {"variant": variant, "skipped": str(exc)}
    import_s = time.perf_counter() - t0
    rss_import = rss_mb()
    t0 = time.perf_counter()
    model = build_model(shape)
    rss_model = rss_mb()
    model, facts = prepare(variant, lib, model, dora)
    setup_s = time.perf_counter() - t0
    rss_setup = rss_mb()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR) if LIBRARY[variant] is not None else None
    batch = make_batch(shape)
    missing_grads = check_grads(model, batch)  # also one more untimed warm-up pass

    losses = [train_step(model, batch, optimizer) for _ in range(warmup)]
    times: list[float] = []
    busy0, cpu0, wall0 = system_busy_s(), time.process_time(), time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(train_step(model, batch, optimizer))
        times.append(time.perf_counter() - start)
    busy1, cpu1, wall1 = system_busy_s(), time.process_time(), time.perf_counter()
    # Share of the machine's CPU that *other* processes used while we were timing:
    # anything well above 0 means the numbers are polluted by a neighbour.
    other_cpu = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (cpu1 - cpu0))
        other_cpu = others / ((wall1 - wall0) * (os.cpu_count() or 1))

    return {
        "variant": variant,
        "use_dora": uses_dora(variant, dora),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "peak_rss_mb": rss_mb(),
        "rss_after_import_mb": rss_import,
        "rss_after_model_mb": rss_model,
        "rss_after_setup_mb": rss_setup,
        "lib_import_s": import_s,
        "setup_s": setup_s,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "trainable_without_grad": missing_grads,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "cpu_per_wall": (cpu1 - cpu0) / (wall1 - wall0),
        "other_cpu_frac": other_cpu,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        **facts,
    }


# -------------------------------------------------------------------------- parent


def spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--json"]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += [flag for flag, on in (("--quick", args.quick), ("--dora", args.dora)) if on]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        return {"variant": variant, "error": f"child exited {proc.returncode}:\n{tail}"}
    return json.loads(lines[-1])


def machine_busy_frac(window_s: float = 2.0) -> float | None:
    """Share of the machine's CPU in use over the next ``window_s`` seconds (we sleep)."""
    b0 = system_busy_s()
    time.sleep(window_s)
    b1 = system_busy_s()
    return None if b0 is None or b1 is None else (b1 - b0) / (window_s * (os.cpu_count() or 1))


def wait_for_idle(max_wait_s: float) -> None:
    """Block until the machine is idle (others use < 2x NOISY_CPU_FRAC) or max_wait_s passes."""
    start = time.monotonic()
    last_note = -math.inf
    while True:
        busy = machine_busy_frac()
        waited = time.monotonic() - start
        if busy is None or busy < 2 * NOISY_CPU_FRAC:
            if waited > 5:
                print(f"  machine idle after {waited:.0f} s", file=sys.stderr)
            return
        if waited >= max_wait_s:
            print(f"  machine still {busy:.0%} busy after {waited:.0f} s; running anyway",
                  file=sys.stderr)
            return
        if waited - last_note >= 60:
            print(f"  machine {busy:.0%} busy; waiting for it to go idle", file=sys.stderr)
            last_note = waited
        time.sleep(3.0)


def run_rounds(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Run the children interleaved, round by round; drop variants that skip or fail."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    active = list(args.variants)
    for rnd in range(1, args.repeats + 1):
        for variant in list(active):
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            res = spawn(variant, args)
            runs[variant].append(res)
            if "skipped" in res or "error" in res:
                kind = "SKIPPED" if "skipped" in res else "FAILED"
                print(f"[round {rnd}] {variant}: {kind}: {res.get('skipped') or res['error']}",
                      file=sys.stderr)
                active.remove(variant)
                continue
            print(f"[round {rnd}] {variant}: median step {res['step_s_median']:.3f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB, trainable {res['trainable']:,}, "
                  f"other processes' CPU {fmt(res['other_cpu_frac'], '.0%')}", file=sys.stderr)
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per variant: median over rounds of the per-child median step time and peak RSS."""
    out: dict[str, dict[str, Any]] = {}
    for variant, results in runs.items():
        ok = [r for r in results if "step_s_median" in r]
        if not ok:
            first = results[0]
            out[variant] = {"status": "skipped" if "skipped" in first else "failed",
                            "reason": first.get("skipped") or first.get("error")}
            continue
        out[variant] = {
            "status": "ok",
            "use_dora": ok[0].get("use_dora", False),
            "rounds": len(ok),
            "step_s": statistics.median(r["step_s_median"] for r in ok),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
            "step_s_per_round": [r["step_s_median"] for r in ok],
            "peak_rss_mb_per_round": [r["peak_rss_mb"] for r in ok],
            "trainable": ok[0]["trainable"],
            "total": ok[0]["total"],
            "lib_trainable": ok[0].get("lib_trainable"),
            "loss_first": ok[0]["loss_first"],
            "other_cpu_frac_max": max((r["other_cpu_frac"] or 0.0) for r in ok),
        }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return None if a is None or b in (None, 0) else a / b


def paired_ratio(summary: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    """Median over rounds of a's step time / b's in the same round.

    Children of one round run back to back, so a slow spell of the machine hits both sides of
    a pair: this is steadier than the ratio of the two medians when the machine drifts.
    """
    sa, sb = summary.get(a, {}).get("step_s_per_round"), summary.get(b, {}).get("step_s_per_round")
    if not sa or not sb:
        return None
    return statistics.median(x / y for x, y in zip(sa, sb))


def pair_ratios(summary: dict[str, dict[str, Any]], a: str, b: str,
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


def compute_ratios(summary: dict[str, dict[str, Any]],
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


def check_trainable(summary: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
    """Compare deltatune's trainable parameter count with peft's; None if one is missing."""
    pe, dt = summary.get("peft", {}), summary.get("deltatune", {})
    if pe.get("status") != "ok" or dt.get("status") != "ok":
        return None, "trainable-count check: not run (needs both peft and deltatune)"
    same = pe["trainable"] == dt["trainable"]
    msg = (f"trainable params: peft {pe['trainable']:,} (peft says {pe['lib_trainable']:,}), "
           f"deltatune {dt['trainable']:,} (deltatune says {dt['lib_trainable']:,}) -> "
           + ("MATCH" if same else "MISMATCH"))
    return same, msg


def fmt(x: float | None, spec: str) -> str:
    """Format a number, or 'n/a'."""
    return "n/a" if x is None else format(x, spec)


def markdown(summary: dict[str, dict[str, Any]], ratios: dict[str, float | None],
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


def machine_facts() -> dict[str, Any]:
    """Versions and hardware facts worth keeping next to the numbers (no heavy imports)."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": dist_version("torch"),
        "transformers": dist_version("transformers"),
        "peft": dist_version("peft"),
        "deltatune": dist_version("deltatune"),
        "nproc": os.cpu_count(),
        "nproc_affinity": (len(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity") else None),
        "mem_gib": mem_gib,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "git_commit": git_commit(),
    }


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of this checkout (with '+dirty' if modified), or None."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


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


def display_path(path: Path) -> str:
    """``path`` relative to the current directory when possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
