"""The benchmark harness still runs (tiny model), so `make bench` does not rot between issues."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_suite_quick(tmp_path: Path) -> None:
    """`bench/suite.py --quick` runs every group (tiny models, one process) and writes the report
    with its target table, the JSON with a median per variant that ran, and the sweep plots.
    Only deltatune-fast (before dt.accelerate exists), MiniLM (without its model package) and
    peft-qlora (without bitsandbytes, not a test dependency) may skip."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "suite_quick.md").read_text()
    assert "## Targets" in report and "| figure | group | target | ratio of medians |" in report
    data = json.loads((tmp_path / "suite_quick.json").read_text())
    assert len(data["targets"]) >= 10 and data["groups"]["llama"]["summary"]["deltatune"]["status"] == "ok"
    for name, group in data["groups"].items():
        for key, summary in group["summary"].items():
            if summary["status"] == "skipped":
                assert key in ("deltatune-fast", "peft-qlora") or name == "minilm", (name, key, summary)
                continue
            assert summary["status"] == "ok", (name, key, summary)
            assert summary["step_s"] > 0 and summary["peak_rss_mb"] > 0
    for plot in ("suite_quick_sweep_seq.svg", "suite_quick_sweep_rank.svg"):
        assert "<svg" in (tmp_path / plot).read_text()


def test_sweep_plot_draws_every_series_and_is_reproducible(tmp_path: Path) -> None:
    """The sweep plots (matplotlib, SVG): title, axis labels and one legend entry per variant that
    ran, and the same bytes when remade from the same result."""
    sys.path.insert(0, str(ROOT / "bench"))
    from suite_report import write_plots

    specs = {f"{v}-{r}": {"variant": v, "rank": r} for v in ("peft", "deltatune", "floor") for r in (4, 16, 64)}
    summary = {k: {"status": "ok", "step_s": 1.0 + spec["rank"] / 100} for k, spec in specs.items()}
    summary.update({f"floor-{r}": {"status": "skipped"} for r in (4, 16, 64)})  # no point, no line
    result = {"groups": {"sweep-rank": {"sweep": "rank", "title": "rank sweep", "specs": specs, "summary": summary},
                         "llama": {"sweep": None, "specs": {}, "summary": {}}}}
    assert write_plots(result, tmp_path, "s") == {"sweep-rank": "s_sweep_rank.svg"}
    svg = (tmp_path / "s_sweep_rank.svg").read_text()
    for text in ("rank sweep", "LoRA rank r", "median step time (s)", ">peft<", ">deltatune<"):
        assert text in svg, text
    assert ">floor<" not in svg
    (tmp_path / "again").mkdir()
    write_plots(result, tmp_path / "again", "s")
    assert (tmp_path / "again" / "s_sweep_rank.svg").read_text() == svg


def test_bound_products_compute_a_lora_layers_forward_and_gradients() -> None:
    """bench/bounds.py times the products of a LoRA step: check that they are those products
    (right shapes, right operands) against autograd on y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bounds import Buffers, base_products, lora_products

    torch.manual_seed(0)
    tokens, in_dim, out_dim, rank = 12, 10, 7, 3
    buf, weight = Buffers(tokens), torch.randn(out_dim, in_dim)
    products = base_products(buf, weight, input_grad=True)
    lora, (a, b) = lora_products(buf, out_dim, in_dim, rank, input_grad=True)
    order = [products[0], *lora[:2], products[1], *lora[2:]]  # forward, then backward
    for product in order:
        product()
    x, g = buf.get("x", in_dim).clone().requires_grad_(), buf.get("g", out_dim)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y = x @ weight.t() + 2.0 * (x @ a_ref.t()) @ b_ref.t()
    y.backward(g)
    torch.testing.assert_close(buf.get("y", out_dim), y.detach())
    torch.testing.assert_close(buf.get("dx", in_dim), x.grad)
    torch.testing.assert_close(a.grad * 2.0, a_ref.grad)  # the bound leaves s out of dA's scale
    torch.testing.assert_close(b.grad * 2.0, b_ref.grad)
    forward_only, _ = lora_products(buf, out_dim, in_dim, rank, input_grad=True, backward=False)
    assert len(forward_only) == 2  # an inference forward: x·Aᵀ and the accumulated h·Bᵀ


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bound_adapts_the_layers_deltatune_adapts(arch: str) -> None:
    """The bound steps time the low-rank products of exactly the layers "all-linear" adapts."""
    import deltatune as dt
    from conftest import tiny_gpt2, tiny_llama

    sys.path.insert(0, str(ROOT / "bench"))
    from bounds import dense_layers, is_adapted

    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    bound_names = {name for name, _ in dense_layers(model) if is_adapted(name)}
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    adapted = {name.removesuffix(".deltas.default.A") for name, _ in model.named_parameters()
               if name.endswith(".deltas.default.A")}
    assert bound_names and bound_names == adapted


def test_adapterhub_bench_figures_from_fabricated_runs() -> None:
    """bench/adapterhub_bench.py (it needs `adapters`, so only in .venv-adapters) parses its flags
    and turns per-round child results into the issue's figures: the step ratio, and peak RSS above
    the floor's round by round. Fabricated results: no child runs, nothing is imported but the parent."""
    sys.path.insert(0, str(ROOT / "bench"))
    from adapterhub_bench import collect, parse_args, render
    from adapterhub_child import AhSpec

    args = parse_args(["--quick"])
    assert (args.model, args.repeats, args.threads, args.modes) == ("bert-random", 1, 1, ["train", "infer"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "2"])  # a full run needs >= 5 timed steps
    with pytest.raises(ValueError):
        AhSpec(mode="infer", variant="floor").validate()

    def child(step: float, rss: float) -> dict[str, object]:
        return {"step_s_median": step, "peak_rss_mb": rss, "trainable": 10, "total": 100, "other_cpu_frac": 0.0,
                "loss_first": 0.7, "logits_abs_mean": 0.1}

    runs = {"train/floor": [child(1.0, 600), child(1.0, 610)],
            "train/adapters": [child(1.2, 660), child(1.2, 670)],
            "train/deltatune": [child(1.05, 630), child(1.05, 640)],
            "infer/base": [child(0.5, 400)], "infer/adapters": [child(0.6, 410)], "infer/deltatune": [child(0.55, 405)]}
    result = collect(runs, parse_args(["--repeats", "2"]))
    figures = {(t["figure"], t["a"], t["b"]): t for t in result["targets"] + result["context"]}
    step = figures[("Pfeiffer training step", "deltatune", "adapters")]
    assert step["value"] == pytest.approx(0.875) and step["verdict"] == "met"
    rss = figures[("peak RSS above the floor's", "deltatune", "adapters")]
    assert rss["value"] == pytest.approx(0.5) and rss["verdict"] == "met"
    infer = figures[("unmerged Pfeiffer forward over the base forward", "deltatune", "base")]
    assert infer["value"] == pytest.approx(1.1)
    assert "| Pfeiffer training step (deltatune / adapters) | train | <= 0.90 | 0.875 |" in render(result)
