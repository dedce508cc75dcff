"""dt.combine (adapter arithmetic) against peft's ``add_weighted_adapter``, plus its own rules.

Two LoRA adapters are made in peft with random weights (different alphas, so the scaling folding is
exercised) and saved; ``dt.load`` puts the same two into a fresh copy of the base. Both sides
combine, and the combined adapter's saved tensors and the model outputs must agree within 1e-5.
peft is only ever imported here, as a test oracle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.model import LoraModel
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import conv_net, state_hash, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from deltatune.combine_ops import keep_random

ATOL = 1e-5
MODELS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "wte"]),  # transposed Conv1D layers and an embedding
}
WEIGHTS = {"first": 0.7, "second": -0.4}
SAME_RANK = ("linear", "ties", "magnitude_prune")
ANY_RANK = ("cat", "svd", "ties_svd", "magnitude_prune_svd")
DENSITY = {"ties": 0.5, "magnitude_prune": 0.5, "ties_svd": 0.5, "magnitude_prune_svd": 0.5}
DARE = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


def ranks_for(method: str) -> tuple[int, int]:
    """Different ranks wherever peft allows them."""
    return (4, 4) if method in SAME_RANK or method in DARE[:2] else (4, 6)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``folders(model, ranks, second_targets=None)``: a folder holding peft's saved adapters "first" and
    "second" (by default both on the model's targets), made once."""
    cache: dict[tuple[str, tuple[int, int], tuple[str, ...]], Path] = {}

    def get(model: str, ranks: tuple[int, int], second_targets: list[str] | None = None) -> Path:
        factory, targets = MODELS[model]
        key = (model, ranks, tuple(second_targets or targets))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{model}-{ranks[0]}-{ranks[1]}")
            wrapped = peft.get_peft_model(factory(), peft_lora(ranks[0], 8, targets), adapter_name="first")
            wrapped.add_adapter("second", peft_lora(ranks[1], 3, second_targets or targets))
            wrapped.save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return get


def peft_lora(r: int, alpha: float, targets: list[str]) -> Any:
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)


def output(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(token_ids()).logits.float()


def peft_side(model: str, folder: Path, method: str, out: Path, **options: Any) -> Tensor:
    """peft's combination of the two saved adapters, saved under ``out/mix``; its output."""
    wrapped = peft.PeftModel.from_pretrained(MODELS[model][0](), folder / "first", adapter_name="first")
    wrapped.load_adapter(folder / "second", adapter_name="second")
    wrapped.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "mix", combination_type=method, **options)
    wrapped.set_adapter("mix")
    wrapped.save_pretrained(out, selected_adapters=["mix"])
    return output(wrapped)


def dt_model(model: str, folder: Path) -> nn.Module:
    base = MODELS[model][0]()
    dt.load(base, folder / "first", "first")
    return dt.load(base, folder / "second", "second")


def dt_side(model: str, folder: Path, method: str, out: Path, **options: Any) -> Tensor:
    combined = dt.combine(dt_model(model, folder), WEIGHTS, method, name="mix", **options)
    dt.set_active(combined, "mix")
    dt.save(combined, out, names=["mix"])
    return output(combined)


def saved_tensors(folder: Path) -> dict[str, Tensor]:
    return load_file(folder / "mix" / "adapter_model.safetensors")


def assert_same_tensors(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= ATOL, f"max abs diff {worst:.3g}"


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", [*SAME_RANK, *ANY_RANK])
def test_matches_peft(model: str, method: str, folders: Callable[..., Path], tmp_path: Path) -> None:
    folder = folders(model, ranks_for(method))
    options: dict[str, Any] = {"density": DENSITY[method]} if method in DENSITY else {}
    options.update({"svd_clamp": 0.95} if method == "magnitude_prune_svd" else {})
    want = peft_side(model, folder, method, tmp_path / "peft", **options)
    got = dt_side(model, folder, method, tmp_path / "dt", **options)
    assert_same_tensors(saved_tensors(tmp_path / "dt"), saved_tensors(tmp_path / "peft"))
    assert (want - output(MODELS[model][0]())).abs().max() > 1e-3, "the combination changes nothing: a vacuous test"
    assert (got - want).abs().max().item() <= ATOL
    mine = json.loads((tmp_path / "dt" / "mix" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "mix" / "adapter_config.json").read_text())
    assert (mine["r"], mine["lora_alpha"], sorted(mine["target_modules"])) == (
        theirs["r"], theirs["lora_alpha"], sorted(theirs["target_modules"]))


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_adapters_padded_for_hot_swap_combine_as_their_own_rank(method: str, folders: Callable[..., Path],
                                                                 tmp_path: Path) -> None:
    """``dt.prepare_hotswap`` pads every slot with zero ranks; combining reads each adapter at its own rank,
    so the result is peft's combination of the unpadded adapters (not rank 2r, not refused)."""
    folder = folders("llama", ranks_for(method))
    want = peft_side("llama", folder, method, tmp_path / "peft")
    padded = dt_model("llama", folder)
    dt.prepare_hotswap(padded, target_rank=16)
    combined = dt.combine(padded, WEIGHTS, method, name="mix")
    dt.set_active(combined, "mix")
    dt.save(combined, tmp_path / "dt", names=["mix"])
    assert_same_tensors(saved_tensors(tmp_path / "dt"), saved_tensors(tmp_path / "peft"))
    assert (output(combined) - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("method", ["linear", "ties", "cat", "svd"])
def test_matches_peft_with_different_targets(method: str, folders: Callable[..., Path], tmp_path: Path) -> None:
    """peft targets the union and, on each layer, combines the adapters present there."""
    folder = folders("llama", ranks_for(method), ["v_proj", "up_proj"])
    options: dict[str, Any] = {"density": 0.5} if method == "ties" else {}
    want = peft_side("llama", folder, method, tmp_path / "peft", **options)
    got = dt_side("llama", folder, method, tmp_path / "dt", **options)
    assert_same_tensors(saved_tensors(tmp_path / "dt"), saved_tensors(tmp_path / "peft"))
    assert any("up_proj" in k for k in saved_tensors(tmp_path / "dt")) and (got - want).abs().max().item() <= ATOL


CONV_TARGETS = ["conv2", "pointwise", "embed", "head"]  # peft's SVD path handles Conv2d, not Conv1d


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties_svd"])
def test_matches_peft_on_convolutions(method: str, tmp_path: Path) -> None:
    ranks = (2, 2) if method == "linear" else (2, 3)
    wrapped = peft.get_peft_model(conv_net(), peft_lora(ranks[0], 8, CONV_TARGETS), adapter_name="first")
    wrapped.add_adapter("second", peft_lora(ranks[1], 3, CONV_TARGETS))
    wrapped.save_pretrained(tmp_path)
    options: dict[str, Any] = {"density": 0.5} if method == "ties_svd" else {}
    wrapped.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "mix", combination_type=method, **options)
    wrapped.save_pretrained(tmp_path / "peft", selected_adapters=["mix"])
    model = conv_net()
    dt.load(model, tmp_path / "first", "first")
    dt.load(model, tmp_path / "second", "second")
    dt.save(dt.combine(model, WEIGHTS, method, name="mix", **options), tmp_path / "dt", names=["mix"])
    assert_same_tensors(saved_tensors(tmp_path / "dt"), saved_tensors(tmp_path / "peft"))


def test_svd_on_a_conv1d_reproduces_the_sum_at_full_rank() -> None:
    """A (out, in, k) change is truncated as the (out, in * k) matrix it is (peft cannot do Conv1d)."""
    model = conv_net()
    dt.attach(model, lora(r=2, target_modules=["conv1"]), name="first")
    dt.attach(model, lora(r=3, lora_alpha=5, target_modules=["conv1"]), name="second")
    dt.combine(model, WEIGHTS, "svd", name="mix", svd_rank=5)
    deltas = model.conv1.deltas
    want = 0.7 * deltas["first"].low_rank_weight() - 0.4 * deltas["second"].low_rank_weight()
    assert deltas["mix"].A.shape == (5, 8, 3)
    assert (deltas["mix"].low_rank_weight() - want).abs().max().item() <= ATOL


def test_rslora_scaling_is_folded_once() -> None:
    """The adapters' alpha / sqrt(r) goes into the factors; the result runs at scaling 1, rsLoRA off."""
    model = tiny_llama()
    dt.attach(model, lora(r=4, lora_alpha=6, use_rslora=True), name="first")
    dt.attach(model, lora(r=4, lora_alpha=2), name="second")
    dt.combine(model, WEIGHTS, "cat", name="mix")
    config = model.deltatune_state.configs["mix"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (8, 8, False)
    deltas = model.model.layers[0].self_attn.q_proj.deltas
    assert deltas["first"].scaling == 3.0 and deltas["mix"].scaling == 1.0
    want = 0.7 * deltas["first"].low_rank_weight() - 0.4 * deltas["second"].low_rank_weight()
    assert (deltas["mix"].low_rank_weight() - want).abs().max().item() <= ATOL


@contextmanager
def peft_draws_from(seed: int) -> Iterator[None]:
    """Reseed torch's global RNG right after peft has built the new adapter (its init draws too), so
    that peft's DARE masks come from the stream a ``generator=seed`` gives deltatune."""
    original = LoraModel.inject_adapter

    def reseeded(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        torch.manual_seed(seed)
        return result

    LoraModel.inject_adapter = reseeded  # type: ignore[method-assign]
    try:
        yield
    finally:
        LoraModel.inject_adapter = original  # type: ignore[method-assign]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", DARE)
def test_dare_matches_peft_with_aligned_draws(model: str, method: str, folders: Callable[..., Path],
                                              tmp_path: Path) -> None:
    """peft draws ``torch.bernoulli`` masks layer by layer (A's then B's, or each ΔW in its stored layout),
    adapter by adapter; deltatune draws in the same order, so one seed gives the same adapter."""
    folder = folders(model, ranks_for(method))
    with peft_draws_from(7):
        want = peft_side(model, folder, method, tmp_path / "peft", density=0.4)
    got = dt_side(model, folder, method, tmp_path / "dt", density=0.4, generator=7)
    assert_same_tensors(saved_tensors(tmp_path / "dt"), saved_tensors(tmp_path / "peft"))
    assert (got - want).abs().max().item() <= ATOL


def test_dare_keeps_a_density_fraction_rescaled() -> None:
    tensor = torch.randn(200, 100) + 3.0  # no zeros
    kept = keep_random(tensor, 0.3, torch.Generator().manual_seed(0))
    mask = kept != 0
    assert abs(mask.float().mean().item() - 0.3) < 0.01  # 20000 draws: sd 0.003
    assert torch.allclose(kept[mask], tensor[mask] / 0.3)


def test_dare_on_factors_rescales_what_it_keeps(folders: Callable[..., Path]) -> None:
    """With the second adapter weighted 0, dare_linear's A is ``sqrt(s) A_first`` on the kept entries, / density."""
    model = dt_model("llama", folders("llama", (4, 4)))
    dt.combine(model, {"first": 1.0, "second": 0.0}, "dare_linear", name="mix", density=0.25, generator=3)
    kept, total = 0, 0
    for module in model.modules():
        if isinstance(getattr(module, "deltas", None), nn.ModuleDict) and "mix" in module.deltas:
            first, mix = module.deltas["first"], module.deltas["mix"]
            expected = first.A * first.scaling ** 0.5 / 0.25
            nonzero = mix.A != 0
            assert torch.allclose(mix.A[nonzero], expected[nonzero])
            kept, total = kept + int(nonzero.sum()), total + mix.A.numel()
    assert abs(kept / total - 0.25) < 0.05  # ~1400 draws: sd 0.012


def test_dare_is_reproducible_by_seed(folders: Callable[..., Path]) -> None:
    def mixed(seed: int) -> list[Tensor]:
        model = dt.combine(dt_model("llama", folders("llama", (4, 4))), WEIGHTS, "dare_ties", name="mix",
                           density=0.5, generator=torch.Generator().manual_seed(seed))
        return [t.clone() for k, t in sorted(model.state_dict().items()) if ".mix." in k]

    first, again, other = mixed(1), mixed(1), mixed(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def dense_changes(folder: Path, alpha: float, r: int) -> dict[str, Tensor]:
    """Module path -> ``(alpha / r) B @ A`` from a saved adapter's file."""
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            out[key.removesuffix(".lora_A.weight")] = (alpha / r) * b.double() @ a.double()
    return out


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_inverse_norm_weighting_against_a_dense_reference(method: str, folders: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    """Per layer, ``λ_i = w_i (1/‖ΔW_i‖) / Σ_j (1/‖ΔW_j‖)`` and the result is ``Σ λ_i ΔW_i``
    (cat is exact; svd at full rank 4 + 6 = 10 reproduces it up to rounding)."""
    folder = folders("llama", (4, 6))
    model = dt.combine(dt_model("llama", folder), WEIGHTS, method, name="mix", weighting="inverse_norm",
                       **({"svd_rank": 10} if method == "svd" else {}))
    dt.save(model, tmp_path, names=["mix"])
    first, second = dense_changes(folder / "first", 8, 4), dense_changes(folder / "second", 3, 6)
    combined = dense_changes(tmp_path / "mix", 10, 10)
    assert combined.keys() == first.keys()
    for key, got in combined.items():
        inverse = [1 / torch.linalg.norm(first[key]).item(), 1 / torch.linalg.norm(second[key]).item()]
        lam = [w * i / sum(inverse) for w, i in zip(WEIGHTS.values(), inverse)]
        want = lam[0] * first[key] + lam[1] * second[key]
        assert (got - want).abs().max().item() <= ATOL * max(1.0, want.abs().max().item())


def test_one_adapter_is_reproduced_linearly(folders: Callable[..., Path]) -> None:
    """peft combines a single adapter linearly whatever the method: ``ΔW = w ΔW_first`` at its rank."""
    model = dt.combine(dt_model("llama", folders("llama", (4, 6))), {"first": -0.5}, "svd", name="mix")
    for module in model.modules():
        if isinstance(getattr(module, "deltas", None), nn.ModuleDict) and "mix" in module.deltas:
            first, mix = module.deltas["first"], module.deltas["mix"]
            assert mix.A.shape == first.A.shape and mix.scaling == 1.0
            assert torch.allclose(mix.low_rank_weight(), -0.5 * first.low_rank_weight(), atol=1e-6)


def test_result_is_added_inactive_and_frozen(folders: Callable[..., Path]) -> None:
    model = dt_model("llama", folders("llama", (4, 4)))
    dt.combine(model, WEIGHTS, "linear", name="mix")
    assert dt.adapter_names(model) == ["first", "second", "mix"]
    assert dt.active_adapters(model) == ("first",)
    assert all(not p.requires_grad for k, p in model.named_parameters() if ".mix." in k)


@pytest.mark.parametrize("method", ["cat", "svd", "ties"])
def test_combined_adapter_loads_in_peft(method: str, folders: Callable[..., Path], tmp_path: Path) -> None:
    folder = folders("gpt2", ranks_for(method))
    got = dt_side("gpt2", folder, method, tmp_path, **({"density": 0.5} if method == "ties" else {}))
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "mix")
    assert (output(theirs) - got).abs().max().item() <= ATOL


def test_saved_module_copy_is_carried_over() -> None:
    """The result keeps a copy of the one trained copy of a saved module (peft would start from the original)."""
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                   init_lora_weights=False), name="first")
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False), name="second")
    with torch.no_grad():
        model.lm_head.copies["first"].weight.add_(1.0)
    dt.combine(model, WEIGHTS, "cat", name="mix")
    assert torch.equal(model.lm_head.copies["mix"].weight, model.lm_head.copies["first"].weight)
    assert model.lm_head.copies["mix"] is not model.lm_head.copies["first"]


def tied_llama() -> nn.Module:
    """``tiny_llama`` with its output head tied to its embedding table (tie_word_embeddings, as SmolLM2)."""
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_tied_saved_copies_stay_tied() -> None:
    """Copies that share a tensor in the source (a tied head and embedding, as ``ties_saved_copies`` keeps
    them) share one in the result: one table, counted once, and the outputs of the dense combination."""
    model = tied_llama()
    dt.attach(model, lora(modules_to_save=["embed_tokens", "lm_head"]), name="first")
    dt.attach(model, lora(lora_alpha=2), name="second")
    table = model.model.embed_tokens.copies["first"].weight
    with torch.no_grad():
        table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(3)))
    model.lm_head.copies["first"].weight = table  # the tie a tying method's copies keep
    dt.combine(model, WEIGHTS, "cat", name="mix")
    mixed = model.model.embed_tokens.copies["mix"].weight
    assert model.lm_head.copies["mix"].weight is mixed and mixed is not table
    layers = {k: m.deltas for k, m in model.named_modules() if isinstance(getattr(m, "deltas", None), nn.ModuleDict)}
    changes = sum(p.numel() for deltas in layers.values() for p in deltas["mix"].parameters())
    assert changes > 0 and dt.adapter_parameters(model, "mix") == changes + table.numel()  # the table once
    oracle = tied_llama()
    with torch.no_grad():
        oracle.model.embed_tokens.weight.copy_(table)
        for key, deltas in layers.items():
            change = sum(w * deltas[n].scaling * deltas[n].B @ deltas[n].A for n, w in WEIGHTS.items())
            oracle.get_submodule(key).weight.add_(change)
    dt.set_active(model, "mix")
    want = output(oracle)  # fp32 logits up to ~40: float rounding relative to their size
    assert (output(model) - want).abs().max().item() <= ATOL * max(1.0, want.abs().max().item())


# -- refusals: each before anything changes --


def lora(r: int = 4, **fields: Any) -> dt.LoraConfig:
    return dt.LoraConfig(**{"r": r, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **fields})


def two_loras(second: Any = None, first: Any = None) -> nn.Module:
    model = tiny_llama()
    dt.attach(model, first or lora(), name="first")
    dt.attach(model, second or lora(lora_alpha=2), name="second")
    return model


SECOND_OF_ANOTHER_KIND = {
    "bottleneck": lambda: dt.SeqBnConfig(reduction_factor=4),
    "prompt": lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "dora": lambda: lora(use_dora=True),
    "ia3": lambda: dt.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "vera": lambda: dt.VeraConfig(r=4, target_modules=["q_proj"]),
    "adalora": lambda: dt.AdaLoraConfig(init_r=4, target_r=2, total_step=8, target_modules=["q_proj"]),
}


@pytest.mark.parametrize("kind", list(SECOND_OF_ANOTHER_KIND))
def test_refuses_adapters_without_factor_form(kind: str) -> None:
    assert_refused(two_loras(SECOND_OF_ANOTHER_KIND[kind]()), dt.AdapterError, WEIGHTS, "svd")


REFUSALS: dict[str, tuple[Callable[[], nn.Module], type[Exception], dict[str, Any], str, dict[str, Any]]] = {
    "unknown-adapter": (two_loras, dt.AdapterError, {"first": 1.0, "third": 1.0}, "svd", {}),
    "name-taken": (two_loras, dt.AdapterError, WEIGHTS, "svd", {"name": "second"}),
    "no-adapters": (tiny_llama, dt.AdapterError, WEIGHTS, "svd", {}),
    "linear-ranks-differ": (lambda: two_loras(lora(r=6)), dt.AdapterError, WEIGHTS, "linear", {}),
    "ties-ranks-differ": (lambda: two_loras(lora(r=6)), dt.AdapterError, WEIGHTS, "ties", {"density": 0.5}),
    "rank-pattern-linear": (lambda: two_loras(lora(rank_pattern={"v_proj": 2}), lora(rank_pattern={"v_proj": 2})),
                            dt.AdapterError, WEIGHTS, "linear", {}),
    "regex-and-list": (lambda: two_loras(lora(target_modules=r".*\.q_proj")), dt.AdapterError, WEIGHTS, "svd", {}),
    "selections-differ": (lambda: two_loras(lora(layers_to_transform=[1]), lora(layers_to_transform=[0])),
                          dt.AdapterError, WEIGHTS, "cat", {}),
    "both-save-lm_head": (lambda: two_loras(lora(modules_to_save=["lm_head"]), lora(modules_to_save=["lm_head"])),
                          dt.AdapterError, WEIGHTS, "svd", {}),
    "unknown-method": (two_loras, dt.ConfigError, WEIGHTS, "average", {}),
    "ties-without-density": (two_loras, dt.ConfigError, WEIGHTS, "ties", {}),
    "density-zero": (two_loras, dt.ConfigError, WEIGHTS, "dare_linear", {"density": 0.0}),
    "density-above-one": (two_loras, dt.ConfigError, WEIGHTS, "magnitude_prune", {"density": 1.5}),
    "density-for-linear": (two_loras, dt.ConfigError, WEIGHTS, "linear", {"density": 0.5}),
    "bad-sign-method": (two_loras, dt.ConfigError, WEIGHTS, "ties", {"density": 0.5, "majority_sign_method": "mean"}),
    "svd-rank-too-large": (two_loras, dt.ConfigError, WEIGHTS, "svd", {"svd_rank": 17}),  # v_proj is 32 -> 16
    "svd-rank-for-cat": (two_loras, dt.ConfigError, WEIGHTS, "cat", {"svd_rank": 4}),
    "bad-clamp": (two_loras, dt.ConfigError, WEIGHTS, "svd", {"svd_clamp": 2.0}),
    "bad-weight": (two_loras, dt.ConfigError, {"first": "high", "second": 0.5}, "svd", {}),
    "no-weights": (two_loras, dt.ConfigError, {}, "svd", {}),
    "bad-weighting": (two_loras, dt.ConfigError, WEIGHTS, "svd", {"weighting": "softmax"}),
    "bad-generator": (two_loras, dt.ConfigError, WEIGHTS, "dare_linear", {"density": 0.5, "generator": "seed"}),
    "svd-driver-on-cpu": (two_loras, dt.ConfigError, WEIGHTS, "svd", {"svd_driver": "gesvd"}),
    "task-head-would-be-lost": (lambda: head_second(), dt.AdapterError, WEIGHTS, "svd", {}),
}


def head_second() -> nn.Module:
    """A classifier whose second adapter (task_type SEQ_CLS) keeps a trained head the first one's config
    would not save."""
    model = tiny_bert()
    dt.attach(model, lora(target_modules=["query", "value"]), name="first")
    dt.attach(model, lora(target_modules=["query", "value"], task_type="SEQ_CLS"), name="second")
    return model


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_the_model_unchanged(case: str) -> None:
    build, error, weights, method, options = REFUSALS[case]
    assert_refused(build(), error, weights, method, **options)


def assert_refused(model: nn.Module, error: type[Exception], weights: dict[str, Any], method: str,
                   **options: Any) -> None:
    before = state_hash(model)
    names = dt.adapter_names(model) if hasattr(model, "deltatune_state") else None
    options.setdefault("name", "mix")
    with pytest.raises(error) as raised:
        dt.combine(model, weights, method, **options)
    assert any(word in str(raised.value) for word in ("dt.combine", "dt.attach", "dt.delete_adapter"))
    assert state_hash(model) == before
    assert (dt.adapter_names(model) if names is not None else None) == names
