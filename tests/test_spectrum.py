"""The ΔW spectrum, subspace similarity phi and amplification against dense oracles, and `inspect --spectrum`.

Oracles: ΔW = (the merged model's weight) - (the base weight), merged by ``dt.unload(merge=True)``
on a copy and decomposed in float64 by torch.linalg.svd; phi by numpy on random orthonormal
bases (identical subspaces give 1, orthogonal ones 0, a random pair the formula evaluated
directly for every i, j).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb, tiny_llama, train_command
from torch import Tensor, nn

import deltatune as dt
from deltatune.cli import main
from deltatune.spectrum import phi_grid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ("q_proj", "v_proj", "down_proj")
CONFIGS: dict[str, Callable[[int], dt.DeltaConfig]] = {
    "lora": lambda r: dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS),
    "dora": lambda r: dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=True),
    "ia3": lambda r: dt.IA3Config(target_modules=TARGETS, feedforward_modules=("down_proj",)),
}


def adapted(method: str, r: int = 4, seed: int = 0) -> nn.Module:
    model = dt.attach(tiny_llama(), CONFIGS[method](r))
    perturb(model, seed)
    return model


def dense_deltas(model: nn.Module) -> dict[str, Tensor]:
    """Oracle: merged weight minus base weight, per adapted module, in float64."""
    base = dict(tiny_llama().named_modules())
    merged = dict(dt.unload(copy.deepcopy(model), merge=True).named_modules())
    return {key: (merged[key].weight.detach().double() - base[key].weight.detach().double()) for key in merged
            if key.endswith(tuple(TARGETS))}


def projector(vectors: Tensor) -> Tensor:
    return vectors.double() @ vectors.double().T


@pytest.mark.parametrize("method", CONFIGS)
def test_spectrum_energy_and_vectors_match_the_dense_svd(method: str) -> None:
    model = adapted(method)
    spec = dt.spectrum(model)
    oracle = dense_deltas(model)
    assert sorted(layer.module for layer in spec.layers) == sorted(oracle)
    for layer in spec.layers:
        u, s, vh = torch.linalg.svd(oracle[layer.module], full_matrices=False)
        assert torch.allclose(layer.singular_values.double(), s, rtol=1e-4, atol=1e-5 * float(s[0]))
        squares = s ** 2
        for k in (1, 2, 4, 8, 16, 5):
            assert layer.energy(k) == pytest.approx(float(squares[:k].sum() / squares.sum()), abs=1e-5)
        if method == "lora":  # B A: r = 4 singular values, the rest zero (a trained magnitude makes DoRA's full)
            assert layer.rank == 4
        top = min(layer.rank, 8)  # well-separated leading singular values: their subspace is unique
        assert torch.allclose(projector(layer.right[:, :top]), projector(vh[:top].T), atol=1e-4)
        assert torch.allclose(projector(layer.left[:, :top]), projector(u[:, :top]), atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_amplification_matches_the_paper_projections(method: str) -> None:
    model = adapted(method)
    base = dict(tiny_llama().named_modules())
    oracle = dense_deltas(model)
    for layer in dt.spectrum(model, amplification_rank=3 if method == "ia3" else None).layers:
        dw, w = oracle[layer.module], base[layer.module].weight.detach().double()
        u, _, vh = torch.linalg.svd(dw, full_matrices=False)
        r = layer.amplification.rank
        assert r == (3 if method == "ia3" else 4)
        on_delta = float((u[:, :r].T @ w @ vh[:r].T).norm())
        a = layer.amplification
        assert a.on_delta == pytest.approx(on_delta, rel=1e-4)
        assert a.on_weight == pytest.approx(float(torch.linalg.svdvals(w)[:r].norm()), rel=1e-4)
        assert a.delta_norm == pytest.approx(float(dw.norm()), rel=1e-4)
        assert a.weight_norm == pytest.approx(float(w.norm()), rel=1e-5)
        assert a.factor == pytest.approx(float(dw.norm()) / on_delta, rel=1e-3)
        assert 0 < a.on_random < a.on_weight  # W's own top directions hold the most of W


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))[0]


def test_phi_is_one_for_identical_and_zero_for_orthogonal_subspaces() -> None:
    a = orthonormal(40, 8, 0)
    assert np.allclose(phi_grid(torch.from_numpy(a), torch.from_numpy(a)).numpy(), 1.0)
    both = orthonormal(40, 14, 1)
    assert np.allclose(phi_grid(torch.from_numpy(both[:, :6]), torch.from_numpy(both[:, 6:])).numpy(), 0.0, atol=1e-12)
    rotated = a @ np.linalg.qr(np.random.default_rng(2).standard_normal((8, 8)))[0]  # same span, other basis
    assert phi_grid(torch.from_numpy(a), torch.from_numpy(rotated))[-1, -1] == pytest.approx(1.0)


def test_phi_of_random_bases_is_the_formula() -> None:
    a, b = orthonormal(30, 5, 3), orthonormal(30, 9, 4)
    grid = phi_grid(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    expected = np.array([[np.linalg.norm(a[:, :i].T @ b[:, :j], "fro") ** 2 / min(i, j) for j in range(1, 10)]
                         for i in range(1, 6)])
    assert grid.shape == (5, 9) and np.allclose(grid, expected, atol=1e-12)
    assert (grid >= 0).all() and (grid <= 1 + 1e-12).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_subspace_similarity_of_two_adapters_against_numpy(side: str) -> None:
    small, large = adapted("lora", r=2, seed=1), adapted("lora", r=8, seed=2)
    similarities = dt.subspace_similarity(dt.spectrum(small), dt.spectrum(large), side=side)  # type: ignore[arg-type]
    deltas_small, deltas_large = dense_deltas(small), dense_deltas(large)
    assert sorted(s.module for s in similarities) == sorted(deltas_small)
    for s in similarities:
        u_a, _, vh_a = np.linalg.svd(deltas_small[s.module].numpy())
        u_b, _, vh_b = np.linalg.svd(deltas_large[s.module].numpy())
        a, b = (vh_a[:2].T, vh_b[:8].T) if side == "right" else (u_a[:, :2], u_b[:, :8])
        expected = [[np.linalg.norm(a[:, :i].T @ b[:, :j]) ** 2 / min(i, j) for j in range(1, 9)] for i in (1, 2)]
        assert s.grid.shape == (2, 8) and np.allclose(s.grid.numpy(), expected, atol=1e-4)


def test_two_adapters_on_one_model_and_a_scaled_copy_share_their_subspace() -> None:
    model = adapted("lora", r=4)
    dt.attach(model, CONFIGS["lora"](4), name="twice")
    with torch.no_grad():
        for _, module in model.named_modules():
            deltas = getattr(module, "deltas", None)
            if deltas is not None and "twice" in deltas:
                for (_, mine), (_, theirs) in zip(sorted(deltas["default"].named_parameters()),
                                                  sorted(deltas["twice"].named_parameters()), strict=True):
                    theirs.copy_(mine * 1.5)  # ΔW scaled by 1.5^2: the same subspaces
    first, second = dt.spectrum(model, "default"), dt.spectrum(model, "twice")
    similarities = dt.subspace_similarity(first, second)
    assert len(similarities) == 6 and all(s.grid.shape == (4, 4) for s in similarities)
    assert all(torch.allclose(s.grid, torch.ones_like(s.grid), atol=1e-4) for s in similarities)
    with pytest.raises(dt.AdapterError, match="share no changed layer named"):
        dt.subspace_similarity(first, second, layers=["model.layers.0.mlp.up_proj"])


def test_a_zero_change_has_no_energy_and_no_directions() -> None:
    model = dt.attach(tiny_llama(), CONFIGS["lora"](4))  # B = 0 at init: ΔW = 0
    spec = dt.spectrum(model)
    assert all(layer.rank == 0 and layer.energy(4) is None and layer.right.shape[1] == 0 for layer in spec.layers)
    assert all(layer.amplification.rank == 0 and layer.amplification.factor == float("inf") for layer in spec.layers)
    assert spec.energy(4) == [] and dt.subspace_similarity(spec, dt.spectrum(adapted("lora"))) == []


def test_spectrum_leaves_the_model_unchanged() -> None:
    from conftest import state_hash

    model = adapted("dora")
    before = state_hash(model)
    dt.spectrum(model)
    assert state_hash(model) == before


@pytest.mark.parametrize("config", [dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                                    dt.SeqBnConfig(reduction_factor=4)], ids=["prompt-tuning", "bottleneck"])
def test_an_adapter_without_a_weight_change_is_refused(config: dt.DeltaConfig) -> None:
    model = dt.attach(tiny_llama(), config)
    with pytest.raises(dt.AdapterError, match="no ΔW"):
        dt.spectrum(model)
    with pytest.raises(dt.AdapterError, match="no adapter named 'other'"):
        dt.spectrum(model, "other")


# ------------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> list[Path]:
    runs = []
    for r in ("4", "8"):
        out = tmp_path_factory.mktemp(f"r{r}")
        assert main(train_command(tiny_bert_dir, sentiment_file, out, "--r", r, "--max-steps", "8",
                                  options=("--lr", "1e-2"))) == 0
        runs.append(out)
    return runs


@pytest.mark.usefixtures("keep_thread_count")
def test_inspect_spectrum_writes_json_and_plot(two_runs: list[Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    out_json, out_png = tmp_path / "s.json", tmp_path / "plots" / "s.png"
    assert main(["inspect", str(two_runs[0]), "--json", str(out_json), "--plot", str(out_png),
                 "--compare", str(two_runs[1]), "--energy-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "eff.rank = exp(entropy" in printed and "Ek = share" in printed and "phi(i, j) =" in printed
    assert '"modules_to_save_absent": [\n    "score"' in printed  # MiniLM's head is `classifier` only
    data = json.loads(out_json.read_text())
    assert data["schema"] == "deltatune.spectrum/1" and data["energy_ks"] == [1, 2, 3, 4, 8, 16]
    query = next(layer for layer in data["layers"] if layer["module"].endswith("layer.0.attention.self.query"))
    s = np.array(query["singular_values"])
    assert query["rank"] == 4 and len(s) == 32
    assert query["energy"]["3"] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    assert data["summary"]["claim"]["layers"] == len(data["layers"])
    phi = np.array(next(item["phi"] for item in data["similarity"]["layers"] if item["module"] == query["module"]))
    assert phi.shape == (4, 8) and (phi >= 0).all() and (phi <= 1 + 1e-9).all()
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("keep_thread_count")
def test_inspect_spectrum_errors_are_one_clear_line(two_runs: list[Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    assert main(["inspect", str(two_runs[0]), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'deltatune[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    assert main(["inspect", str(two_runs[0]), "--spectrum", "--energy-k", "0"]) == 2
    assert "energy_k" in capsys.readouterr().err
