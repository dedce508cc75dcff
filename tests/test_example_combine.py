"""examples/combine_domains.py runs end to end: two tiny LoRA runs (a few steps of a tiny random BERT,
one per domain), then the example's ``main``, every combine method with each member's head."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import sentiment_rows, train_command, write_jsonl

from deltatune.cli import main as deltatune
from deltatune.train.commands import evaluate_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("combine_domains", ROOT / "examples" / "combine_domains.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def domain_rows(domain: str, seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [*sentiment_rows(48, seed, "train"), *sentiment_rows(12, seed + 100, "test")]
    return [{**row, "domain": domain} for row in rows]


def test_combine_domains_main(example: ModuleType, tiny_bert_dir: Path, tmp_path: Path,
                              keep_thread_count: None) -> None:
    movies = write_jsonl(tmp_path / "movies.jsonl", domain_rows("movieReviewSnippets", 1))
    other = write_jsonl(tmp_path / "other.jsonl", domain_rows("tweets", 2))
    both = write_jsonl(tmp_path / "both.jsonl", [*domain_rows("movieReviewSnippets", 1), *domain_rows("tweets", 2)])
    for data in (movies, other):
        args = train_command(tiny_bert_dir, data, tmp_path / data.stem, "--max-steps", "3", "--method", "lora",
                             "--target-modules", "query", "value")
        assert deltatune(args) == 0
    out = tmp_path / "results.json"
    assert example.main([str(tmp_path / "movies"), str(tmp_path / "other"), "--data", str(both),
                         "--json", str(out)]) == 0

    record = json.loads(out.read_text())
    assert record["sizes"] == {"movieReviewSnippets": 12, "other": 12}
    results = record["results"]
    assert len(results) == 2 + 2 * len(example.COMBOS)
    assert [(r["adapter"], r["head"]) for r in results[:2]] == [("movies alone", "movies"), ("other alone", "other")]
    assert {r["head"] for r in results[2:]} == {"movies", "other"}
    for result in results:
        assert set(result["accuracy"]) == {"movieReviewSnippets", "other", "all"}
        assert all(0.0 <= value <= 1.0 for value in result["accuracy"].values())
    # a member alone is measured exactly as `deltatune eval` measures its run
    for result, run in zip(results[:2], ("movies", "other"), strict=True):
        assert result["accuracy"]["all"] == pytest.approx(
            evaluate_run(tmp_path / run, str(both), "test")["accuracy"], abs=1e-12)


def test_lora_only_drops_the_head(example: ModuleType, tiny_bert_dir: Path, sentiment_file: Path, tmp_path: Path,
                                  keep_thread_count: None) -> None:
    assert deltatune(train_command(tiny_bert_dir, sentiment_file, tmp_path / "run", "--max-steps", "1",
                                   "--target-modules", "query", "value")) == 0
    folder = example.lora_only(tmp_path / "run" / "adapter", tmp_path / "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["task_type"] is None
    from safetensors.torch import load_file

    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
