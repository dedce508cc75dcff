"""What every benchmark here shares: processes, rounds, medians, ratios and machine facts.

Why a module of its own: ``lora_step.py`` (one table, deltatune vs peft) and ``suite.py`` (every
figure of the speed/memory issue) must measure the same way, so that a number in one can be
compared with the other. The rules they share live here once:

* each measurement runs in a fresh child process, so that its peak RSS (``ru_maxrss``) is its own;
* children run interleaved, round by round, so that a slow spell of the machine hits every
  variant alike; each child reports the median of its timed steps, the parent the median over
  rounds (and the median of per-round ratios, which is steadier on a drifting machine);
* while steps are timed, the share of the CPU taken by other processes is recorded, so that a
  polluted number can be recognised.

What the drivers (suite.py, adapterhub_bench.py, methods_step.py) and their children share lives
here too, so that a fix reaches all of them: ``guarded`` (a child's skip or error becomes a result
of its own), the report's first lines and problem bullets, the writing of the JSON and the report,
and the flags every driver takes.

Nothing here imports torch: the parent stays light and its own RSS does not matter, and every
child imports it from either environment (.venv, and .venv-adapters for adapterhub_child.py).
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
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
NOISY_CPU_FRAC = 0.05  # warn when neighbours take more than this share of the CPU

Runs = dict[str, list[dict[str, Any]]]  # variant key -> one result per round
Summary = dict[str, dict[str, Any]]  # variant key -> medians over rounds


class SkipVariant(Exception):
    """The variant cannot run here (e.g. deltatune is not importable, or lacks an API yet)."""


# ------------------------------------------------------------------------- in a child


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minor_faults() -> int:
    """Minor page faults of this process so far: each first touch of a fresh page is one, so
    their count per step shows how much of a step is spent getting memory from the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def system_busy_s() -> float | None:
    """CPU seconds all processes on the machine have spent busy, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal, not guest


@dataclass(frozen=True)
class Timing:
    """Wall time of each timed call, and how much of the CPU we and our neighbours used."""

    times: list[float]
    cpu_per_wall: float
    other_cpu_frac: float | None  # share of the machine's CPU other processes used meanwhile


def time_calls(fn: Callable[[], Any], n: int) -> tuple[Timing, list[Any]]:
    """Call ``fn`` n times, timing each call; return the timing and what each call returned."""
    results: list[Any] = []
    times: list[float] = []
    busy0, cpu0, wall0 = system_busy_s(), time.process_time(), time.perf_counter()
    for _ in range(n):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    busy1, cpu1, wall1 = system_busy_s(), time.process_time(), time.perf_counter()
    # Anything well above 0 means a neighbour polluted the numbers.
    other = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (cpu1 - cpu0))
        other = others / ((wall1 - wall0) * (os.cpu_count() or 1))
    return Timing(times, (cpu1 - cpu0) / (wall1 - wall0), other), results


def guarded(measure: Callable[[], dict[str, Any]], spec: Any) -> dict[str, Any]:
    """``measure()``, with a SkipVariant or any other exception turned into a result of its own
    (``skipped``: why; ``error``: the traceback's tail) naming ``spec`` (a dataclass with a
    ``variant``), so that the parent records it and the other variants still run."""
    try:
        return measure()
    except SkipVariant as exc:
        return {"variant": spec.variant, "spec": asdict(spec), "skipped": str(exc)}
    except Exception:
        tail = "\n".join(traceback.format_exc().splitlines()[-20:])
        return {"variant": spec.variant, "spec": asdict(spec), "error": tail}


# ---------------------------------------------------------------------------- parent


def json_lines(text: str) -> list[dict[str, Any]]:
    """The lines of a child's stdout that are JSON objects (libraries may print other lines)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


MALLOC_RETAIN_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
"""glibc keeps freed memory mapped: what ``dt.retain_freed_memory()`` sets, for any process."""


def spawn_json(cmd: Sequence[str], env: dict[str, str] | None = None) -> list[dict[str, Any]] | str:
    """Run a child command (with ``env`` added to ours); return the JSON objects it printed,
    or why there are none."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    found = json_lines(proc.stdout)
    if proc.returncode != 0 or not found:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        return f"child exited {proc.returncode}:\n{tail}"
    return found


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


def log_result(prefix: str, key: str, res: dict[str, Any]) -> None:
    """One stderr line per child: its median step and peak RSS, or why it did not run."""
    if "skipped" in res or "error" in res:
        kind = "SKIPPED" if "skipped" in res else "FAILED"
        print(f"{prefix} {key}: {kind}: {res.get('skipped') or res['error']}", file=sys.stderr)
        return
    print(f"{prefix} {key}: median step {res['step_s_median']:.3f} s, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB, trainable {res['trainable']:,}, "
          f"other processes' CPU {fmt(res['other_cpu_frac'], '.0%')}", file=sys.stderr)


def run_rounds(keys: Sequence[str], run_one: Callable[[str], dict[str, Any]], repeats: int,
               wait_idle_s: float, prefix: str = "", *, alternate: bool = False, show_total: bool = False,
               after_round: Callable[[Runs, int], object] | None = None) -> Runs:
    """Run ``run_one(key)`` for every key, interleaved, ``repeats`` rounds; a key that skips or
    fails is dropped from later rounds (it would only skip or fail again).

    ``alternate``: every other round runs in reverse order, so that no key always runs first or
    next to the same neighbour. ``show_total``: the log says ``round k/repeats``, not ``round k``.
    ``after_round(runs, rounds done)`` runs after each round (e.g. the report of the rounds so far,
    which an interrupted run then keeps).
    """
    runs: Runs = {k: [] for k in keys}
    active = list(keys)
    for rnd in range(1, repeats + 1):
        for key in (list(reversed(active)) if alternate and rnd % 2 == 0 else list(active)):
            if wait_idle_s > 0:
                wait_for_idle(wait_idle_s)
            res = run_one(key)
            runs[key].append(res)
            log_result(f"[{prefix}round {rnd}{f'/{repeats}' if show_total else ''}]", key, res)
            if "skipped" in res or "error" in res:
                active.remove(key)
        if after_round is not None:
            after_round(runs, rnd)
    return runs


def summarize(runs: Runs) -> Summary:
    """Per variant: median over rounds of the per-child median step time and peak RSS."""
    out: Summary = {}
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
            "loss_first": ok[0].get("loss_first"),
            "other_cpu_frac_max": max((r["other_cpu_frac"] or 0.0) for r in ok),
        }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return None if a is None or b in (None, 0) else a / b


def paired_ratio(summary: Summary, a: str, b: str, key: str = "step_s_per_round") -> float | None:
    """Median over rounds of a's value / b's in the same round (step time by default).

    Children of one round run back to back, so a slow spell of the machine hits both sides of
    a pair: this is steadier than the ratio of the two medians when the machine drifts.
    """
    pairs = round_ratios(summary, a, b, key)
    return statistics.median(pairs) if pairs else None


def round_ratios(summary: Summary, a: str, b: str, key: str = "step_s_per_round") -> list[float] | None:
    """a's value / b's, round by round (rounds where b's is zero left out); None when either has none."""
    sa, sb = summary.get(a, {}).get(key), summary.get(b, {}).get(key)
    if not sa or not sb:
        return None
    return [x / y for x, y in zip(sa, sb) if y]


def fmt(x: float | None, spec: str) -> str:
    """Format a number, or 'n/a'."""
    return "n/a" if x is None else format(x, spec)


def report_head(title: str, machine: Mapping[str, Any], quick: str | None) -> list[str]:
    """A report's first lines: its title, a quick run's warning (``quick``: what makes it quick),
    the date and commit, and the machine's CPU, cores and memory (a bullet the caller may extend)."""
    m = machine
    out = [f"# {title}", ""]
    if quick:
        out += [f"**Quick smoke run** ({quick}): these numbers mean nothing about performance.", ""]
    return out + [f"- date: {m['date']}; git commit: {m['git_commit']}",
                  f"- CPU: {m['cpu_model'] or m['machine']}; cores {m['nproc']} (usable {m['nproc_affinity']}); "
                  f"memory {fmt(m['mem_gib'], '.1f')} GiB"]


def summary_problems(summary: Summary, label: str = "", cpu: str = "the CPU") -> list[str]:
    """A report's bullets for one summary: each skipped or failed variant with the last line of
    why, and each whose timing other processes polluted; ``label`` goes before the variant's key
    (e.g. its group), ``cpu`` names what they used a share of."""
    out = []
    for key, s in summary.items():
        if s["status"] != "ok":
            reason = (s["reason"] or "").strip().splitlines()
            out.append(f"- {label}{key}: {s['status']}: {reason[-1] if reason else ''}")
        elif s["other_cpu_frac_max"] > NOISY_CPU_FRAC:
            out.append(f"- {label}{key}: other processes used up to {s['other_cpu_frac_max']:.0%} of {cpu} "
                       "while it was timed")
    return out


def write_result(out_dir: Path, stem: str, result: Mapping[str, Any],
                 make_report: Callable[[], str]) -> tuple[str, str]:
    """Write ``stem``.json (every number), then ``stem``.md (``make_report()``, called once the
    numbers are saved, so that a report that fails to render loses none) into ``out_dir``;
    return the report and its path for display. Each file is written aside and renamed over
    the old one, so that a run interrupted while writing keeps the previous file whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_text(out_dir / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    report = make_report()
    replace_text(out_dir / f"{stem}.md", report)
    return report, display_path(out_dir / f"{stem}.md")


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: into a file beside it, renamed over it."""
    aside = path.with_name(path.name + ".tmp")
    aside.write_text(text)
    os.replace(aside, path)


# ---------------------------------------------------------------------- command lines


def driver_parser(doc: str | None) -> argparse.ArgumentParser:
    """A driver's parser: the first paragraph of its docstring as the description."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_flags(p: argparse.ArgumentParser, out_help: str = "default bench/results") -> None:
    """--wait-idle and --out-dir, as every driver that writes a report takes them."""
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each child, wait up to this long for the machine to go idle")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results", help=out_help)


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace, defaults: Mapping[str, Any],
                counts: Sequence[str]) -> argparse.Namespace:
    """``args`` with every flag left unset taken from ``defaults`` (chosen by --quick); a usage
    error for a full run under 5 timed steps, or for any of ``counts`` (dest names) below 1 or
    --warmup below 0."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.quick and args.steps < 5:
        p.error("--steps must be >= 5 for a full run (use --quick for a smoke test)")
    if min(getattr(args, name) for name in counts) < 1 or args.warmup < 0:
        flags = ", ".join("--" + name.replace("_", "-") for name in counts)
        p.error(f"need {flags} >= 1 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------- machine facts


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
        "bitsandbytes": dist_version("bitsandbytes"),
        "deltatune": dist_version("deltatune") or "this checkout's src/ (not installed)",
        "nproc": os.cpu_count(),
        "nproc_affinity": (len(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity") else None),
        "mem_gib": mem_gib,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "git_commit": git_commit(),
    }


def cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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


def display_path(path: Path) -> str:
    """``path`` relative to the current directory when possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
