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
