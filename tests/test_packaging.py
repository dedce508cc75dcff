"""What the install commands install (issue 14, packaging): the base dependencies cover dt.save, `make test`
runs the plain-install check (tests/plain_install/check.py in a fresh .venv-plain), and `make demo`
installs only what the demo needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def recipe(target: str) -> str:
    """The lines of a Makefile rule, from its target line to the next blank line."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*?(?=\n\n|\Z)", text, flags=re.S | re.M)
    assert match, f"no Makefile rule for {target}"
    return match.group(0)


def test_base_dependencies_cover_saving() -> None:
    """safetensors' torch saving imports numpy, which safetensors does not declare."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    names = {re.split(r"[<>=!~ ;\[]", d)[0].lower()
             for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert {"torch", "safetensors", "numpy"} <= names


def test_make_test_runs_the_plain_install_check() -> None:
    assert "$(MAKE) test-plain" in recipe("test")
    plain = recipe("test-plain")
    assert "pip install --quiet ." in plain and "tests/plain_install/check.py" in plain
    assert "[" not in plain.split("pip install --quiet .")[1].split("\n")[0]  # no extras
    assert ".venv-plain/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "$(PLAIN_VENV)" in recipe("clean") and ".venv-plain" in (ROOT / ".ci" / "run").read_text()


def test_make_demo_installs_only_the_hf_extra() -> None:
    demo = recipe("demo")
    assert ".demo-installed" in demo
    installs = recipe("$(BIN)/.demo-installed")
    assert '".[hf]"' in installs and "test" not in installs


def test_the_plain_check_refuses_an_environment_with_extras() -> None:
    """Run here (transformers, peft installed), the check says the environment is not plain."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "plain_install" / "check.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "not a plain install" in done.stderr
