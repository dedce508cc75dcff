"""ΔW spectrum of a study's runs at 3 seeds (docs/experiments.md, "ΔW spectrum at 3 seeds").

Reads run folders that the sweeps wrote (runs/ is not committed: run the sweeps a study names first) and
aggregates, with deltatune's own analysis (``dt.spectrum``, ``dt.subspace_similarity``, the code behind
``deltatune inspect --spectrum``):

- per cell, layer depth and matrix kind: the share of ||ΔW||_F^2 in the top k singular values, mean ± std
  over seeds, and how many matrices exceed 0.9 at k = 8 and 16;
- phi (Hu et al. 2021, section 7.2) between seeds of one cell, and between full fine-tuning's top 8
  directions and the study's LoRA cells;
- the amplification factor (section 7.3) at each layer's numerical rank (at most 64) and at r = 8.

Studies: ``minilm`` (MiniLM sentiment: experiments/memory_quality_minilm.yaml and
target_modules_minilm.yaml), ``smollm2`` (SmolLM2 WordNet: experiments/rank_ablation_smollm2.yaml).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/spectrum_seeds.py                   # 2.5 minutes on one core
    OMP_NUM_THREADS=1 .venv/bin/python experiments/spectrum_seeds.py --study smollm2   # about 15 minutes

writes experiments/results/spectrum_<study>.{json,md,png}. std is the sample std (n - 1) over seeds
(over seed pairs for phi), as in `deltatune sweep report`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from deltatune.spectrum import Side
from deltatune.train.commands import model_for_adapter



@dataclass(frozen=True)
class Study:
    """The run folders of one model and task, and how to read their matrix names."""

    title: str
    cells: dict[str, str]
    """label -> cell folder under the sweeps folder; "full" (full fine-tuning) is required."""
    detailed: tuple[str, ...]
    """cells with a depth x kind table in the markdown"""
    full_vs: tuple[str, ...]
    """LoRA cells that full fine-tuning's top 8 directions are compared with"""
    width: int
    """the model's hidden size: the dimension of a random subspace's reference line in the plot"""


STUDIES = {
    "minilm": Study("MiniLM sentiment", {
        "full": "memory_quality_minilm/method=full__lr=5e-05__weight_decay=0",
        "lora_qv": "memory_quality_minilm/method=lora__r=8__lora_alpha=16",
        "lora_all": "target_modules_minilm/target_modules=all-linear",
        "lora_q": "target_modules_minilm/target_modules=query",
        "lora_qk": "target_modules_minilm/target_modules=query+key",
        "lora_qkv": "target_modules_minilm/target_modules=query+key+value",
        "lora_qkvo": "target_modules_minilm/target_modules=query+key+value+attention.output.dense",
    }, ("full", "lora_qv", "lora_all"), ("lora_qv", "lora_all"), 384),
    "smollm2": Study("SmolLM2-135M WordNet definitions", {
        "full": "rank_ablation_smollm2/method=full__lr=5e-05__weight_decay=0",
        "lora_r8": "rank_ablation_smollm2/method=lora__r=8__lora_alpha=16",
        "lora_r64": "rank_ablation_smollm2/method=lora__r=64__lora_alpha=16",
    }, ("full", "lora_r64"), ("lora_r8", "lora_r64"), 576),
}
SEEDS = (0, 1, 2)
KS = (1, 2, 4, 8, 16)
SHARE = 0.9
PHI_AT = ((1, 1), (1, 8), (4, 4), (8, 8))
CURVE_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 384)  # points of the cumulative energy curves
KINDS = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attn.out", "intermediate.dense": "ffn.in", "output.dense": "ffn.out",
         "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "ffn.gate", "mlp.up_proj": "ffn.up", "mlp.down_proj": "ffn.down"}
MODULE = re.compile(r"\.layers?\.(\d+)\.(.+)$")  # BERT's encoder.layer.<d>.<kind>, LLaMA's model.layers.<d>.<kind>

Spectra = dict[str, list[dt.AdapterSpectrum]]  # label -> one spectrum per seed, in SEEDS order


def mean_std(values: Sequence[float]) -> list[float]:
    """[mean, sample std] rounded for the JSON (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return [round(statistics.fmean(values), 4), round(std, 4)]


def depth_kind(module: str) -> tuple[int, str]:
    match = MODULE.search(module)
    if match is None:
        raise ValueError(f"{module!r} is not a layer's matrix (expected '...layer.<depth>.<kind>' or '...layers...')")
    return int(match.group(1)), KINDS.get(match.group(2), match.group(2))


def load_spectra(sweeps: Path, cells: dict[str, str], amplification_rank: int | None) -> Spectra:
    """Each cell's spectrum per seed; ``amplification_rank`` as in ``dt.spectrum``."""
    spectra: Spectra = {}
    for label, cell in cells.items():
        spectra[label] = []
        for seed in SEEDS:
            folder = sweeps / cell / f"seed-{seed}"
            if not (folder / "run.json").is_file():
                raise SystemExit(f"{folder} is not a finished run folder: run the sweep that makes it "
                                 f"(experiments/{cell.split('/')[0]}.yaml) or pass --sweeps")
            model, _ = model_for_adapter(folder)
            spectra[label].append(dt.spectrum(model, dt.adapter_names(model)[0], amplification_rank=amplification_rank))
            del model  # a full fine-tuning model holds base + ΔW: free it before the next load
    return spectra


def k_share(layer: dt.LayerSpectrum) -> int:
    """The fewest singular values that hold SHARE of ||ΔW||_F^2."""
    return int((layer.cumulative_energy() < SHARE).sum()) + 1


def energy_summary(specs: list[dt.AdapterSpectrum], detailed: bool) -> dict[str, Any]:
    """E_k over all matrices (and per (depth, kind) when ``detailed``), the matrices above SHARE at
    k = 8, 16, and k90 (the fewest singular values holding SHARE)."""
    if len({tuple(layer.module for layer in spec.layers) for spec in specs}) != 1:
        raise ValueError("the seeds of one cell adapt different matrices: cannot aggregate them per matrix")
    by_layer = []
    for index, layer in enumerate(specs[0].layers):
        seeds = [spec.layers[index] for spec in specs]
        depth, kind = depth_kind(layer.module)
        by_layer.append({"depth": depth, "kind": kind, "rank": mean_std([s.rank for s in seeds]),
                         "energy": {str(k): mean_std([s.energy(k) or 0.0 for s in seeds]) for k in KS},
                         "k90": mean_std([k_share(s) for s in seeds])})
    exceeding = {str(k): {"count": mean_std([sum(e > SHARE for e in spec.energy(k)) for spec in specs]),
                          "of": len(specs[0].layers)} for k in (8, 16)}
    overall = {str(k): mean_std([statistics.fmean(spec.energy(k)) for spec in specs]) for k in KS}
    k90 = mean_std([statistics.median(k_share(layer) for layer in spec.layers) for spec in specs])
    return {"by_layer": by_layer if detailed else [], "mean_over_matrices": overall, "exceeding": exceeding, "k90_median": k90}


def phi_summary(pairs: Iterable[tuple[dt.AdapterSpectrum, dt.AdapterSpectrum]], side: Side) -> dict[str, Any]:
    """phi at PHI_AT averaged over layers, mean ± std over pairs, with the random-subspace level max(i, j) / d."""
    per_pair: dict[str, list[float]] = {f"{i},{j}": [] for i, j in PHI_AT}
    chance: dict[str, list[float]] = {f"{i},{j}": [] for i, j in PHI_AT}
    by_kind: dict[str, list[float]] = {}
    for first, second in pairs:
        sims = dt.subspace_similarity(first, second, side)
        for i, j in PHI_AT:
            per_pair[f"{i},{j}"].append(statistics.fmean(s.phi(i, j) for s in sims))
            chance[f"{i},{j}"].append(statistics.fmean(max(i, j) / _dimension(first, s.module, side) for s in sims))
        for s in sims:
            by_kind.setdefault(depth_kind(s.module)[1], []).append(s.phi(8, 8))
    return {"phi": {key: mean_std(v) for key, v in per_pair.items()},
            "random": {key: round(statistics.fmean(v), 4) for key, v in chance.items()},
            "phi_8_8_by_kind": {kind: round(statistics.fmean(v), 4) for kind, v in by_kind.items()}}


def _dimension(spec: dt.AdapterSpectrum, module: str, side: Side) -> int:
    """The space the compared vectors live in: ΔW's input size (right) or output size (left)."""
    shape = next(layer.shape for layer in spec.layers if layer.module == module)
    return shape[1] if side == "right" else shape[0]


def phi_diagonal(pairs: Iterable[tuple[dt.AdapterSpectrum, dt.AdapterSpectrum]], size: int = 8) -> list[float]:
    """phi(i, i) for i = 1..size, right side, averaged over layers and pairs (for the plot)."""
    grids = [torch.stack([s.grid[:size, :size] for s in dt.subspace_similarity(a, b, "right")]).mean(0)
             for a, b in pairs]
    return [round(float(v), 4) for v in torch.stack(grids).mean(0).diagonal()]


def seed_pairs(specs: list[dt.AdapterSpectrum]) -> list[tuple[dt.AdapterSpectrum, dt.AdapterSpectrum]]:
    return list(itertools.combinations(specs, 2))


def amplification_summary(specs: list[dt.AdapterSpectrum]) -> dict[str, Any]:
    """Section 7.3 over every matrix and seed: the factor and W's projections, as medians (min, max)."""
    amps = [layer.amplification for spec in specs for layer in spec.layers]
    factors = [a.factor for a in amps]
    return {"rank": sorted({a.rank for a in amps}),
            "factor_median": round(statistics.median(factors), 4),
            "factor_range": [round(min(factors), 4), round(max(factors), 4)],
            "on_delta_over_random_median": round(statistics.median(a.on_delta / a.on_random for a in amps), 4),
            "on_weight_over_delta_median": round(statistics.median(a.on_weight / a.on_delta for a in amps), 4),
            "relative_norm_median": round(statistics.median(a.delta_norm / a.weight_norm for a in amps), 5)}


def energy_curves(specs: list[dt.AdapterSpectrum]) -> dict[str, list[float]]:
    """Cumulative energy at CURVE_KS per depth, averaged over kinds and seeds."""
    by_depth: dict[int, list[torch.Tensor]] = {}
    for spec in specs:
        for layer in spec.layers:
            curve = layer.cumulative_energy()  # beyond its length (a narrow matrix's rank) the share is 1
            by_depth.setdefault(depth_kind(layer.module)[0], []).append(curve[[min(k, len(curve)) - 1 for k in CURVE_KS]])
    return {str(d): [round(float(v), 4) for v in torch.stack(c).mean(0)] for d, c in sorted(by_depth.items())}


def summarise(study: str, spectra: Spectra, full_r8: list[dt.AdapterSpectrum]) -> dict[str, Any]:
    chosen = STUDIES[study]
    full = spectra["full"]
    versus = {f"full_vs_{label}": [(f, o) for f in full for o in spectra[label]] for label in chosen.full_vs}
    pairs = {**{f"{label}_seeds": seed_pairs(specs) for label, specs in spectra.items()}, **versus}
    return {
        "schema": "deltatune.spectrum_seeds/1",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python experiments/spectrum_seeds.py"
                   + ("" if study == "minilm" else f" --study {study}"),
        "study": study,
        "cells": {label: {"folder": cell, "seeds": list(SEEDS)} for label, cell in chosen.cells.items()},
        "energy_ks": list(KS), "share": SHARE,
        "energy": {label: energy_summary(specs, label in chosen.detailed) for label, specs in spectra.items()},
        "phi": {name: {side: phi_summary(p, side) for side in ("right", "left")} for name, p in pairs.items()},
        "phi_diagonal_right": {name: phi_diagonal(p) for name, p in pairs.items()},
        "amplification": {**{label: amplification_summary(specs) for label, specs in spectra.items()},
                          "full_at_r8": amplification_summary(full_r8)},
        "full_energy_curves": energy_curves(full),
    }


def fmt(value: Sequence[float], digits: int = 3) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def compact(text: str) -> str:
    """JSON with every list of numbers on one line."""
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def markdown(result: dict[str, Any]) -> str:
    energy, ks, study = result["energy"], result["energy_ks"], STUDIES[result["study"]]
    lines = [f"# ΔW spectrum at 3 seeds: {study.title}", "",
             f"Made by `{result['command']}` from the run folders; mean ± sample std over seeds 0-2.", "",
             "## Energy of the top k singular values, mean over the adapted matrices", "",
             "| cell | matrices | " + " | ".join(f"E{k}" for k in ks) + " | E8 > 0.9 | E16 > 0.9 | k90 (median) |",
             "|---|---|" + "---|" * (len(ks) + 3)]
    for label, e in energy.items():
        over = [f"{fmt(e['exceeding'][k]['count'], 1)} of {e['exceeding'][k]['of']}" for k in ("8", "16")]
        lines.append(f"| {label} | {e['exceeding']['8']['of']} | "
                     + " | ".join(fmt(e["mean_over_matrices"][str(k)]) for k in ks)
                     + f" | {' | '.join(over)} | {fmt(e['k90_median'], 1)} |")
    lines += ["", "A LoRA r = 8 ΔW has rank 8: E8 = E16 = 1 by construction; its E1-E4 say how it uses its 8 "
              "directions. k90: the fewest singular values holding 90% of ||ΔW||_F^2."]
    for label in study.detailed:
        lines += ["", f"## {label}: per layer depth and matrix kind", "",
                  "| depth | kind | rank | " + " | ".join(f"E{k}" for k in ks) + " | k90 |",
                  "|---|---|---|" + "---|" * (len(ks) + 1)]
        for row in energy[label]["by_layer"]:
            lines.append(f"| {row['depth']} | {row['kind']} | {row['rank'][0]:.0f} | "
                         + " | ".join(fmt(row["energy"][str(k)]) for k in ks) + f" | {fmt(row['k90'], 1)} |")
    lines += ["", "## Subspace similarity φ (mean over layers; ± std over pairs of runs)", "",
              "| pair | side | φ(1,1) | φ(1,8) | φ(4,4) | φ(8,8) | random φ(8,8) |", "|---|---|---|---|---|---|---|"]
    for name, sides in result["phi"].items():
        for side, s in sides.items():
            lines.append(f"| {name} | {side} | " + " | ".join(fmt(s["phi"][f"{i},{j}"]) for i, j in PHI_AT)
                         + f" | {s['random']['8,8']:.3f} |")
    lines += ["", "## Amplification (Hu et al. section 7.3), over every matrix and seed", "",
              "| cell | r | factor median (range) | on_delta / on_random | on_weight / on_delta | ‖ΔW‖/‖W‖ |",
              "|---|---|---|---|---|---|"]
    for label, a in result["amplification"].items():
        r = a["rank"][0] if len(a["rank"]) == 1 else f"{a['rank'][0]}-{a['rank'][-1]}"
        lines.append(f"| {label} | {r} | {a['factor_median']:.3g} ({a['factor_range'][0]:.3g} - "
                     f"{a['factor_range'][1]:.3g}) | {a['on_delta_over_random_median']:.3g} | "
                     f"{a['on_weight_over_delta_median']:.3g} | {a['relative_norm_median']:.3g} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    study = STUDIES[result["study"]]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for depth, curve in result["full_energy_curves"].items():
        axes[0].plot(CURVE_KS, curve, marker=".", label=f"layer {depth}")
    axes[0].axhline(SHARE, color="grey", linestyle=":")
    axes[0].set(title="full fine-tuning: energy of the top k (mean over kinds, seeds)", xlabel="k", xscale="log",
                ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    for name, diagonal in result["phi_diagonal_right"].items():
        if name.startswith(("full", *study.full_vs)):
            axes[1].plot(range(1, len(diagonal) + 1), diagonal, marker="o", label=name)
    axes[1].plot(range(1, 9), [i / study.width for i in range(1, 9)], color="grey", linestyle=":",
                 label=f"random (i / {study.width})")
    axes[1].set(title="φ(i, i), right side, mean over layers and pairs", xlabel="i", ylim=(0, None))
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--study", choices=sorted(STUDIES), default="minilm", help="whose run folders (default minilm)")
    parser.add_argument("--sweeps", type=Path, default=Path("runs/sweeps"), help="the sweeps' output folder")
    parser.add_argument("--output", type=Path, help="writes OUTPUT.json, OUTPUT.md and OUTPUT.png "
                        "(default experiments/results/spectrum_<study>)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cells = STUDIES[args.study].cells
    output = args.output or Path(f"experiments/results/spectrum_{args.study}")
    spectra = load_spectra(args.sweeps, cells, None)
    full_r8 = load_spectra(args.sweeps, {"full": cells["full"]}, 8)["full"]
    result = summarise(args.study, spectra, full_r8)
    output.with_suffix(".json").write_text(compact(json.dumps(result, indent=1)) + "\n", encoding="utf-8")
    output.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    if not args.no_plot:
        plot(result, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
