"""Architecture rules that code review alone would let slip (DESIGN.md principles 1-3, 10)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import deltatune
import deltatune.registry as registry

SRC = Path(deltatune.__file__).parent
GENERIC = ["adapters", "analysis", "bases", "combine", "combine_layer", "combine_ops", "compose", "config",
           "factor_form", "fastfood", "hf", "hotswap", "inject", "intrinsic", "io", "layer", "merge", "param_site",
           "projections", "registry", "routing", "spectrum", "spectrum_report", "state", "targets",
           "methods/named_folders",  # the NAME=FOLDER parser every recipe over saved adapters shares
           *(f"sweep/{p.stem}" for p in sorted((SRC / "sweep").glob("*.py")))]
METHOD_WORDS = re.compile(r"(?<![A-Za-z])(?i:lora|ia3|dora|adalora|vera|bitfit|prompt.?tuning|p.?tuning|prefix.?tuning"
                          r"|mixlora|loftq)|(?<![A-Za-z])(?:Poly|POLY|poly_)")
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


TRAINING_SIDE = ["cli.py", *(str(p.relative_to(SRC)) for p in sorted((SRC / "train").rglob("*.py")))]


@pytest.mark.parametrize("path", TRAINING_SIDE)
def test_trainer_and_cli_name_no_method(path: str) -> None:
    """The trainer and the command line ask the registry (recipes) for method knowledge."""
    text = (SRC / path).read_text()
    hits = [f"{path}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if METHOD_WORDS.search(line)]
    assert not hits, "\n".join(hits)


def _imports(path: Path) -> set[str]:
    """The deltatune modules ``path`` imports anywhere in it (top level or inside functions)."""
    import ast

    module = ".".join(("deltatune", *path.relative_to(SRC).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(n for n in [target, *names] if n.startswith("deltatune"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("deltatune"))
    return found


def test_no_import_cycles() -> None:
    """No module imports (even lazily, inside a function) one that imports it back: the layering
    is a graph without cycles. Package __init__ files only gather their package and are left out."""
    paths = {".".join(("deltatune", *p.relative_to(SRC).with_suffix("").parts)): p
             for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    graph = {name: {t for t in _imports(path) if t in paths and t != name} for name, path in paths.items()}
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in trail and nxt > start:  # each cycle reported once, from its smallest module
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, "\n".join(sorted(set(cycles))[:10])
