"""bench/methods_step.py (every method's step relative to LoRA's): its cells, its figures, and one real child."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

SWEEP = """\
seeds: [3, 4]
base: {max_steps: 50, batch_size: 16}
cells:
  - {method: lora, r: 8, lora_alpha: 16.0}
  - {method: lora, r: 8, lora_alpha: 16.0, use_rslora: true}
  - {method: lora, r: 8, lora_alpha: 16.0, init_lora_weights: "pissa"}
  - {method: ia3, lr: 5.0e-3}
  - {method: ia3, target_modules: [query], feedforward_modules: []}
"""


def test_cells_are_the_sweeps_with_short_labels(tmp_path: Path) -> None:
    """One variant per sweep cell (not per seed), labelled by what sets it apart, with the cell's own options
    (base + cell), nothing added (a method without targets gets its architecture default in the child, as
    in `deltatune train`). Two cells that would share a label keep their cell names."""
    from methods_step import variants_from_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP, encoding="utf-8")
    variants = variants_from_sweep(path)
    names = ["method=ia3,lr=0.005", "method=ia3,target_modules=query,feedforward_modules="]
    assert list(variants) == ["lora", "rslora", "pissa", *names]
    assert variants["lora"] == {"cell": "method=lora,r=8,lora_alpha=16",
                                "options": {"max_steps": 50, "batch_size": 16, "method": "lora", "r": 8,
                                            "lora_alpha": 16.0}}
    assert variants["pissa"]["options"]["init_lora_weights"] == "pissa"
    assert "target_modules" not in variants[names[0]]["options"]
    assert variants[names[1]]["options"]["target_modules"] == ["query"]


def test_figures_from_fabricated_runs(tmp_path: Path) -> None:
    """Per-round child results -> ratio of medians, median of per-round ratios (wall and CPU time), step over
    the floor, RSS above the floor; a failed child is reported, not divided by. No child runs here."""
    from methods_step import collect, main, parse_args, render

    args = parse_args(["--repeats", "3"])
    assert (args.batch, args.seq_len, args.steps, args.threads) == (16, 64, 5, 1)
    with pytest.raises(SystemExit):
        parse_args(["--steps", "2"])  # a full run needs >= 5 timed steps

    def child(step: float, cpu: float, rss: float, trainable: int) -> dict[str, object]:
        return {"step_s_median": step, "cpu_step_s_median": cpu, "peak_rss_mb": rss, "trainable": trainable,
                "total": 1000, "other_cpu_frac": 0.02, "cpu_per_wall": 0.5, "method": "x"}

    runs = {"floor": [child(1.0, 0.9, 600, 10), child(2.0, 0.9, 600, 10), child(1.0, 0.9, 600, 10)],
            "lora": [child(2.0, 1.0, 650, 20), child(4.0, 1.0, 660, 20), child(2.0, 1.0, 640, 20)],
            "prompt-tuning": [child(3.0, 2.0, 700, 15), child(4.0, 2.0, 700, 15), child(3.0, 2.0, 700, 15)],
            "ia3": [{"variant": "ia3", "error": "child exited 1:\nConfigError: no targets"}]}
    variants = {k: {"cell": f"method={k}", "options": {"method": k}} for k in ("lora", "prompt-tuning", "ia3")}
    result = collect(runs, variants, args)
    f = result["figures"]["prompt-tuning"]
    assert f["step_over_ref_of_medians"] == pytest.approx(3.0 / 2.0)
    assert f["step_over_ref_per_round"] == pytest.approx(1.5)  # per round: 1.5, 1.0, 1.5
    assert f["cpu_step_over_ref_per_round"] == pytest.approx(2.0)
    assert f["step_over_floor_per_round"] == pytest.approx(3.0)  # 3.0, 2.0, 3.0
    assert f["rss_above_floor_mb"] == pytest.approx(100) and f["trainable"] == 15
    assert result["figures"]["lora"]["step_over_ref_per_round"] == pytest.approx(1.0)
    assert result["figures"]["ia3"]["status"] == "failed"
    report = render(result)
    assert f["step_over_ref_quartiles"] == pytest.approx([1.25, 1.5])  # of 1.5, 1.0, 1.5
    row = "| prompt-tuning | 15 | 3.000 | 1.500 | 1.500 | 1.25-1.50 | 3.000 | 2.000 | 2.000 | 2.00-2.00 | 1.500 | 700 | 100 |"
    assert row in report
    assert "- ia3: failed: ConfigError: no targets" in report
    saved = tmp_path / "methods_step.json"  # --report remakes the same report from the saved result
    saved.write_text(json.dumps(result))
    assert main(["--report", str(saved)]) == 0
    assert (tmp_path / "methods_step.md").read_text() == report
    more = tmp_path / "more.json"  # a second run's rounds appended: twice the rounds, the same per-round ratios
    more.write_text(json.dumps(result))
    assert main(["--report", str(saved), str(more)]) == 0
    merged = json.loads(saved.read_text())
    assert merged["settings"]["rounds_done"] == 6 and merged["figures"]["prompt-tuning"]["rounds"] == 6
    assert merged["figures"]["prompt-tuning"]["step_over_ref_per_round"] == pytest.approx(1.5)


def test_default_sweep_gives_every_method_once() -> None:
    """The default sweep file parses into uniquely labelled variants, LoRA r=8 (the reference) among them."""
    from methods_step import DEFAULT_SWEEP, REFERENCE, variants_from_sweep

    variants = variants_from_sweep(DEFAULT_SWEEP)
    assert REFERENCE in variants and variants[REFERENCE]["options"]["r"] == 8
    assert len({v["cell"] for v in variants.values()}) == len(variants)


@pytest.mark.slow
def test_child_trains_what_the_trainer_trains(tmp_path: Path) -> None:
    """A real child on the tiny BERT: the floor trains the head and pooler only; LoRA r=8 on query/value (the
    trainer's default BERT targets) adds r (in + out) per target per layer; both time their steps."""
    def child(spec: dict[str, object]) -> dict[str, object]:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "methods_child.py"), "--spec", json.dumps(spec),
                               "--steps", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        assert "error" not in result and "skipped" not in result, result
        return result

    options = {"method": "lora", "r": 8, "lora_alpha": 16.0, "max_steps": 50}
    shape = {"quick": True, "batch": 2, "seq_len": 16}
    floor = child({"variant": "floor", "options": options, **shape})
    lora = child({"variant": "lora", "options": options, **shape})
    hidden, layers = 32, 2
    head = (hidden * hidden + hidden) + (hidden * 2 + 2)  # pooler + 2-label classifier
    assert floor["trainable"] == head
    assert lora["trainable"] == head + layers * 2 * 8 * (hidden + hidden)
    for result in (floor, lora):
        assert result["batch_shape"] == [2, 16] and result["trainable_without_grad"] == 0
        assert result["step_s_median"] > 0 and result["peak_rss_mb"] > 0  # type: ignore[operator]
