"""AdapterHub's ``adapters`` is a test-only oracle: the library never imports it (this environment is the
only one where it is installed, so the check lives here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import deltatune

SRC = Path(deltatune.__file__).parent


def test_library_never_imports_adapterhub() -> None:
    """``import adapters`` / ``from adapters ...`` nowhere in the package (its own ``.adapters`` module is fine)."""
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+adapters\b", p.read_text(), re.MULTILINE)]
    assert not offenders


def test_importing_the_block_loads_neither_adapterhub_nor_transformers() -> None:
    code = ("import sys, deltatune, deltatune.methods.bottleneck_block; "
            "print(sorted(m for m in ('adapters', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
