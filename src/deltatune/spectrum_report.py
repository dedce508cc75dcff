"""``deltatune inspect --spectrum``: the ΔW spectrum (and phi against another adapter) as JSON
(schema ``deltatune.spectrum/1``, documented in docs/analysis.md), a text table and matplotlib plots."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .adapters import adapter_names
from .errors import ConfigError
from .spectrum import (ENERGY_KS, AdapterSpectrum, LayerSimilarity, LayerSpectrum, Side, mean_grid, spectrum,
                       subspace_similarity)

SCHEMA = "deltatune.spectrum/1"
CLAIM = (16, 0.9)
"""The claim checked in the summary: the top 16 singular values hold over 90% of ||ΔW||_F^2."""


def _number(value: float | None) -> float | None:
    """JSON has no inf/nan: those become null."""
    return value if value is not None and math.isfinite(value) else None


def layer_dict(layer: LayerSpectrum, ks: Sequence[int]) -> dict[str, Any]:
    a = layer.amplification
    return {
        "module": layer.module, "shape": list(layer.shape), "rank": layer.rank,
        "singular_values": [float(s) for s in layer.singular_values],
        "energy": {str(k): layer.energy(k) for k in ks},
        "amplification": {"rank": a.rank, "weight_norm": a.weight_norm, "delta_norm": a.delta_norm,
                          "on_delta": a.on_delta, "on_weight": a.on_weight, "on_random": a.on_random,
                          "factor": _number(a.factor)},
    }


def summary_dict(spec: AdapterSpectrum, ks: Sequence[int]) -> dict[str, Any]:
    """Per k the mean and the smallest energy over layers, and how many layers meet the claim."""
    k, share = CLAIM
    energies = spec.energy(k)
    return {
        "energy_mean": {str(k): _mean(spec.energy(k)) for k in ks},
        "energy_min": {str(k): min(spec.energy(k), default=None) for k in ks},
        "claim": {"k": k, "share": share, "layers_meeting": sum(e > share for e in energies),
                  "layers": len(energies)},
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def spectrum_dict(spec: AdapterSpectrum, ks: Sequence[int] = ENERGY_KS, source: str = "") -> dict[str, Any]:
    return {"schema": SCHEMA, "source": source, "adapter": spec.adapter, "energy_ks": list(ks),
            "layers": [layer_dict(layer, ks) for layer in spec.layers], "summary": summary_dict(spec, ks)}


def similarity_dict(similarities: Sequence[LayerSimilarity], other: str) -> dict[str, Any]:
    grid = mean_grid(similarities)
    return {"other": other, "side": similarities[0].side if similarities else None,
            "layers": [{"module": s.module, "phi": s.grid.tolist()} for s in similarities],
            "mean_phi": grid.tolist()}


def format_spectrum(spec: AdapterSpectrum, ks: Sequence[int] = ENERGY_KS) -> str:
    """One line per layer: rank, energy of the top k, amplification factor; a legend."""
    head = f"{'module':<48} {'rank':>5} " + " ".join(f"{'E' + str(k):>6}" for k in ks) + f" {'amp':>7}"
    lines = [head]
    for layer in spec.layers:
        energies = " ".join(f"{_cell(layer.energy(k)):>6}" for k in ks)
        lines.append(f"{layer.module:<48} {layer.rank:>5} {energies} {layer.amplification.factor:>7.3g}")
    lines.append("Ek = share of ||ΔW||_F^2 in the top k singular values; amp = ||ΔW||_F / ||U^T W V||_F with U, V "
                 "ΔW's top singular vectors (Hu et al. 2021, section 7.3)")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_similarity(similarities: Sequence[LayerSimilarity]) -> str:
    lines = [f"{'module':<48} {'i x j':>9} {'phi(1,1)':>9} {'phi(i,j)':>9}"]
    for s in similarities:
        i, j = s.grid.shape
        lines.append(f"{s.module:<48} {f'{i}x{j}':>9} {s.phi(1, 1):>9.3f} {s.phi(i, j):>9.3f}")
    lines.append("phi(i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j) over ΔW's singular vectors "
                 "(Hu et al. 2021, section 7.2): 1 = one subspace holds the other, 0 = orthogonal")
    return "\n".join(lines)


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``path`` written whole or not at all: ``write`` fills a temporary file that is renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    temp = Path(name)
    try:
        write(temp)
        mask = os.umask(0)
        os.umask(mask)
        temp.chmod(0o666 & ~mask)  # mkstemp makes it private; a report is an ordinary file
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    _write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))


def require_matplotlib(path: Path) -> None:
    """A clear error, before any work, when the plot extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as error:
        raise ConfigError("deltatune inspect", "plot", str(path), "needs matplotlib, which is not installed",
                          "pip install 'deltatune[plot]'") from error


def plot(spec: AdapterSpectrum, path: Path, similarities: Sequence[LayerSimilarity] = ()) -> None:
    """Normalised σ per layer (log scale), cumulative energy per layer and, with similarities, the
    mean phi heat map; one image (PNG, or what matplotlib makes of the suffix)."""
    require_matplotlib(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if similarities else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for layer in spec.layers:
        s = layer.singular_values[: max(layer.rank, 1)]
        if float(s[0]) > 0:
            axes[0].semilogy(range(1, s.numel() + 1), (s / s[0]).tolist(), alpha=0.6)
            axes[1].plot(range(1, s.numel() + 1), layer.cumulative_energy()[: s.numel()].tolist(), alpha=0.6)
    axes[0].set(title=f"σ_i / σ_1, {len(spec.layers)} layers", xlabel="i")
    axes[1].set(title="energy of the top k", xlabel="k", ylim=(0, 1.02))
    axes[1].axhline(CLAIM[1], color="grey", linestyle=":")
    if similarities:
        grid = mean_grid(similarities)
        image = axes[2].imshow(grid.numpy(), origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto",
                               extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
        axes[2].set(title=f"phi(i, j), mean over layers ({similarities[0].side})", xlabel="j (other)", ylabel="i")
        figure.colorbar(image, ax=axes[2])
    figure.tight_layout()
    _write_atomic(path, lambda temp: figure.savefig(temp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    plt.close(figure)


def inspect_spectrum(source: Path, model_path: str = "", compare: Path | None = None, side: Side = "right",
                     ks: Sequence[int] = ENERGY_KS, json_path: Path | None = None,
                     plot_path: Path | None = None) -> str:
    """What ``deltatune inspect --spectrum`` prints; writes the JSON and the plot when asked."""
    if plot_path is not None:
        require_matplotlib(plot_path)
    if any(k < 1 for k in ks):
        raise ConfigError("deltatune inspect", "energy_k", list(ks), "must be >= 1", "pass e.g. --energy-k 32")
    ks = sorted(set(ks))
    spec = _folder_spectrum(source, model_path)
    data = spectrum_dict(spec, ks, str(source))
    text = format_spectrum(spec, ks)
    similarities: list[LayerSimilarity] = []
    if compare is not None:
        similarities = subspace_similarity(spec, _folder_spectrum(compare, model_path), side)
        data["similarity"] = similarity_dict(similarities, str(compare))
        text += "\n" + format_similarity(similarities)
    if json_path is not None:
        write_json(json_path, data)
    if plot_path is not None:
        plot(spec, plot_path, similarities)
    return text


def _folder_spectrum(folder: Path, model_path: str) -> AdapterSpectrum:
    """The spectrum of the adapter in a run or adapter folder, on the base model it names."""
    from .train.commands import model_for_adapter  # the training side loads transformers: only when used

    model, _ = model_for_adapter(folder, model_path)
    return spectrum(model, adapter_names(model)[0])
