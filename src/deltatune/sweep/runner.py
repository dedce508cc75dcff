"""Run a sweep: every cell x seed as a normal run folder, one results line per run, resumable.

Each run is, by default, a process of its own (``python -m deltatune.sweep``), for two
reasons: its peak resident memory is then the run's own (``os.wait4`` reports the child's
``ru_maxrss``, also for a run killed by the system), not the sweep's high-water mark; and a run
that crashes, leaks or changes process-wide state (threads, allocator settings) cannot affect
the next. The price is a second or two per run to start Python and import torch. ``in_process``
runs them in the sweep's own process instead (tests, quick checks): the memory column then says
``rss_scope: sweep`` and is the process's peak so far.

Resuming: a run whose last line in the results file says "ok" with the same options is skipped;
a failed run, or one whose options changed, runs again (from scratch) and gets a new line. A
run that fails is recorded with its error and the sweep goes on. ``rerun`` names cells to run
again though finished (after a fix to what a run measures): their new lines supersede the old
ones, which stay in the file as history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..train.lock import own_folder
from .cell import peak_rss_mib, rss_to_mib, train_cell, write_json
from .grid import Cell, SweepSpec, check_options, expand
from .results import FAILED, OK, append_record, latest, read_records

Print = Callable[[str], None]
OPTIONS_FILE, RESULT_FILE, LOG_FILE = "sweep_options.json", "sweep_result.json", "train.log"
CHILD_COMMAND = (sys.executable, "-m", "deltatune.sweep")
"""How a run's process is started (``__main__.py``); it gets the options and result file paths."""
Measured = tuple[dict[str, Any], float | None, str]
"""(what the run reported, or {"error": ...}; peak RSS in MiB; the scope of that figure)."""


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing with recorded options."""
    return json.loads(json.dumps(value))


def finished(cell: Cell, done: Mapping[tuple[str, int], Mapping[str, Any]]) -> bool:
    """Whether the results already hold a successful run of this cell and seed with these options."""
    prior = done.get(cell.key)
    return prior is not None and prior.get("status") == OK and prior.get("options") == _plain(dict(cell.options))


_SAY_LOCK = threading.Lock()


def say_now(text: str) -> None:
    # One line per call even from --jobs' threads (print writes the text and its newline apart, so
    # two runs' lines could run together); flushed so a long sweep's progress shows in a redirected log.
    with _SAY_LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def check_rerun(cells: list[Cell], rerun: Sequence[str]) -> None:
    """Refuse a ``rerun`` name that is no cell of the sweep (a typo would silently rerun nothing)."""
    names = list(dict.fromkeys(c.name for c in cells))
    unknown = [name for name in rerun if name not in names]
    if unknown:
        raise ConfigError("deltatune sweep", "--rerun", unknown, "names no cell of this sweep",
                          "pass cell names as the sweep prints them: " + ", ".join(names))


def check_jobs(jobs: int, in_process: bool) -> None:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError("deltatune sweep", "--jobs", jobs, "is how many runs go at once", "pass 1 or more")
    if jobs > 1 and in_process:
        raise ConfigError("deltatune sweep", "--jobs", jobs, "runs in one process cannot go side by side (they "
                          "share torch's threads, seeds and memory figure)", "drop --in-process, or pass --jobs 1")


def run_sweep(spec: SweepSpec, in_process: bool = False, say: Print = say_now,
              rerun: Sequence[str] = (), jobs: int = 1) -> list[dict[str, Any]]:
    """Run every run of ``spec`` not already finished, and every run of the cells named in ``rerun``;
    the records written by this call, in the order the runs finished.

    Every cell's options (and ``rerun``'s names) are checked first, so a misspelt one stops the
    sweep before any run, and the sweep's folder is locked, so a second sweep on it is refused.
    ``jobs`` runs go at once, each in its own process (give each run ``threads`` so that jobs x
    threads fits the cores); a run's line is written when it ends, so a stopped sweep loses only
    the runs under way.
    """
    check_jobs(jobs, in_process)
    cells = expand(spec)
    check_options(cells)
    check_rerun(cells, rerun)
    written: list[dict[str, Any]] = []
    with own_folder(spec.output_dir):
        done = latest(read_records(spec.results)) if spec.results.is_file() else {}
        todo = [c for c in cells if c.name in rerun or not finished(c, done)]
        again = sum(1 for c in todo if finished(c, done))
        say(f"sweep: {len(cells)} runs, {len(cells) - len(todo) + again} already finished, {len(todo)} to run"
            f"{f' ({again} of them again, --rerun)' if again else ''}{f', {jobs} at once' if jobs > 1 else ''}; "
            f"results: {spec.results}")

        def start(number: int, cell: Cell) -> dict[str, Any]:
            say(f"[{number}/{len(todo)}] {cell.name} seed {cell.seed} -> {cell.run_dir}")
            return run_one(cell, in_process)

        pool = ThreadPoolExecutor(max_workers=jobs)  # its threads only wait for the runs' processes
        try:
            runs = [pool.submit(start, number, cell) for number, cell in enumerate(todo, 1)]
            for finished_run in as_completed(runs):
                record = finished_run.result()
                append_record(spec.results, record)  # one writer: this thread
                written.append(record)
                say(f"[{len(written)}/{len(todo)} done] {describe(record)}")
        finally:  # on an error (or Ctrl-C) no queued run starts; the runs under way end first
            pool.shutdown(wait=True, cancel_futures=True)
    return written


def run_one(cell: Cell, in_process: bool) -> dict[str, Any]:
    """Train one run and build its results line (failed runs included)."""
    started = time.perf_counter()
    measured, rss, scope = _here(cell) if in_process else _in_child(cell)
    return record_for(cell, measured, rss, scope, time.perf_counter() - started)


def record_for(cell: Cell, measured: Mapping[str, Any], rss: float | None, scope: str,
               wall_seconds: float) -> dict[str, Any]:
    """The results line of a run from what it reported (see ``results.SCHEMA``)."""
    error = measured.get("error")
    trainable, base = measured.get("trainable_parameters"), measured.get("base_parameters")
    tokens, seconds = measured.get("tokens"), measured.get("train_seconds")
    return {
        "cell": cell.name, "seed": cell.seed, "status": FAILED if error else OK,
        "settings": _plain(dict(cell.settings)), "options": _plain(dict(cell.options)), "run_dir": str(cell.run_dir),
        "metrics": measured.get("metrics", {}), "train_loss": measured.get("train_loss"),
        "steps": measured.get("steps"), "trainable_parameters": trainable, "base_parameters": base,
        "trainable_percent": 100 * trainable / base if trainable is not None and base else None,
        "tokens": tokens, "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if tokens is not None and seconds else None,
        "wall_seconds": wall_seconds, "peak_rss_mib": rss, "rss_scope": scope, "error": error,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _here(cell: Cell) -> Measured:
    try:
        measured = train_cell(cell.run_options())
    except Exception as error:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
        measured = {"error": f"{type(error).__name__}: {error}"}
    return measured, peak_rss_mib(), "sweep"


def _in_child(cell: Cell) -> Measured:
    """Run the cell in a new Python process; its output goes to ``<run_dir>/train.log``."""
    folder = cell.run_dir
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / OPTIONS_FILE, cell.run_options())
    (folder / RESULT_FILE).unlink(missing_ok=True)
    # unbuffered: train.log shows the run's progress while it runs
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"}
    command = [*CHILD_COMMAND, str(folder / OPTIONS_FILE), str(folder / RESULT_FILE)]
    with (folder / LOG_FILE).open("w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        rss, code = _wait(child)
    measured = _read_result(folder / RESULT_FILE)
    if (code != 0 or not measured) and "error" not in measured:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        measured = {"error": f"the run's process {how} before reporting (see {folder / LOG_FILE})"}
    if rss is None:
        rss = measured.pop("peak_rss_mib", None)
    measured.pop("peak_rss_mib", None)
    return measured, rss, "run"


def _wait(child: subprocess.Popen[bytes]) -> tuple[float | None, int]:
    """(the child's peak RSS in MiB where the system reports it, its exit code)."""
    if not hasattr(os, "wait4"):  # Windows: the child's own report is used
        return None, child.wait()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return rss_to_mib(usage.ru_maxrss), child.returncode


def _read_result(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return dict(value) if isinstance(value, dict) else {}


def describe(record: Mapping[str, Any]) -> str:
    """One line about a finished run."""
    head = f"{record['cell']} seed {record['seed']}"
    if record["status"] != OK:
        return f"{head}: FAILED: {record['error']}"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
    rss = f", peak RSS {record['peak_rss_mib']:.0f} MiB" if record["peak_rss_mib"] is not None else ""
    return f"{head}: {metrics or 'no metrics'}; {record['wall_seconds']:.1f} s{rss}"
