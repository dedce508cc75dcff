"""The committed experiment reports (experiments/results/*.md) are what their quoted command makes from the
committed JSONL: the tables in docs/experiments.md rest on files anyone can regenerate with one command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deltatune.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MADE_BY = re.compile(r"^Made by `(deltatune sweep report [^`]+)`", re.MULTILINE)
REPORTS = sorted(p for p in RESULTS.glob("*.md") if MADE_BY.search(p.read_text(encoding="utf-8")))


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_every_sweep_results_file_has_its_report() -> None:
    assert {p.stem for p in REPORTS} == {p.stem for p in RESULTS.glob("*.jsonl")}


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: p.stem)
def test_report_tables_regenerate_from_the_committed_results(report: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    match = MADE_BY.search(report.read_text(encoding="utf-8"))
    assert match is not None
    words = shlex.split(match.group(1))[2:]  # after "deltatune sweep": report RESULTS... [options]
    if "--output" in words:  # the same command, written elsewhere
        at = words.index("--output")
        del words[at:at + 2]
    monkeypatch.chdir(ROOT)  # the quoted paths are relative to the repository root
    again = tmp_path / report.name
    assert main(["sweep", *words, "--output", str(again), "--no-plots"]) == 0
    committed = table_lines(report.read_text(encoding="utf-8"))
    assert len(committed) >= 3 and table_lines(again.read_text(encoding="utf-8")) == committed
