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

Nothing here imports torch: the parent stays light and its own RSS does not matter.
"""

from __future__ import annotations

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
               wait_idle_s: float, prefix: str = "") -> Runs:
    """Run ``run_one(key)`` for every key, interleaved, ``repeats`` rounds; a key that skips or
    fails is dropped from later rounds (it would only skip or fail again)."""
    runs: Runs = {k: [] for k in keys}
    active = list(keys)
    for rnd in range(1, repeats + 1):
        for key in list(active):
            if wait_idle_s > 0:
                wait_for_idle(wait_idle_s)
            res = run_one(key)
            runs[key].append(res)
            log_result(f"[{prefix}round {rnd}]", key, res)
            if "skipped" in res or "error" in res:
                active.remove(key)
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
    sa, sb = summary.get(a, {}).get(key), summary.get(b, {}).get(key)
    if not sa or not sb:
        return None
    pairs = [x / y for x, y in zip(sa, sb) if y]
    return statistics.median(pairs) if pairs else None


def fmt(x: float | None, spec: str) -> str:
    """Format a number, or 'n/a'."""
    return "n/a" if x is None else format(x, spec)


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
