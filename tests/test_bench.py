"""The benchmark harness still runs (tiny model), so `make bench` does not rot between issues."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_lora_step_quick(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lora_step.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "deltatune" in result.stdout and "peft" in result.stdout
    assert data, "the harness wrote an empty result"


def test_suite_quick(tmp_path: Path) -> None:
    """`bench/suite.py --quick` runs every group (tiny models, one process) and writes the report
    with its target table, the JSON with a median per variant that ran, and the sweep plots.
    Only deltatune-fast (before dt.accelerate exists), MiniLM (without its model package) and
    peft-qlora (without bitsandbytes, not a test dependency) may skip."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "suite_quick.md").read_text()
    assert "## Targets" in report and "| figure | group | target | ratio of medians |" in report
    data = json.loads((tmp_path / "suite_quick.json").read_text())
    assert len(data["targets"]) >= 10 and data["groups"]["llama"]["summary"]["deltatune"]["status"] == "ok"
    for name, group in data["groups"].items():
        for key, summary in group["summary"].items():
            if summary["status"] == "skipped":
                assert key in ("deltatune-fast", "peft-qlora") or name == "minilm", (name, key, summary)
                continue
            assert summary["status"] == "ok", (name, key, summary)
            assert summary["step_s"] > 0 and summary["peak_rss_mb"] > 0
    for plot in ("suite_quick_sweep_seq.svg", "suite_quick_sweep_rank.svg"):
        assert (tmp_path / plot).read_text().startswith("<svg")
