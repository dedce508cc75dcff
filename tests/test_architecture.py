"""Architecture rules that code review alone would let slip (DESIGN.md principles 1-3, 10)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import deltatune
import deltatune.registry as registry

SRC = Path(deltatune.__file__).parent
GENERIC = ["adapters", "bases", "config", "hf", "inject", "io", "layer", "merge", "registry", "state", "targets"]
METHOD_WORDS = re.compile(r"(?<![A-Za-z])(?i:lora|ia3|dora|adalora|vera|bitfit|prompt.?tuning|p.?tuning|prefix.?tuning)")
"""A method name not inside a lower-case word ("several" is fine; "LoraConfig" and "use_dora" are not)."""


@pytest.mark.parametrize("module", GENERIC)
def test_generic_code_names_no_method(module: str) -> None:
    """Generic modules never name a method, so adding one touches only its file and registration."""
    text = (SRC / f"{module}.py").read_text()
    hits = [f"{module}.py:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if METHOD_WORDS.search(line)]
    assert not hits, "\n".join(hits)


def test_only_hf_imports_transformers() -> None:
    offenders = [p.name for p in SRC.rglob("*.py") if p.name != "hf.py"
                 and re.search(r"^\s*(import|from)\s+transformers", p.read_text(), re.MULTILINE)]
    assert not offenders


def test_library_never_imports_peft() -> None:
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+peft\b", p.read_text(), re.MULTILINE)]
    assert not offenders


def test_method_files_stay_small() -> None:
    """A method is one file of about 150 lines, 250 at most (principle 1)."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (SRC / "methods").glob("*.py")}
    assert all(n <= 250 for n in sizes.values()), sizes


def test_every_registered_method_has_its_file() -> None:
    for name in registry.method_names():
        method = registry.method_named(name)
        assert method.config_class.__module__.startswith("deltatune.methods.")
