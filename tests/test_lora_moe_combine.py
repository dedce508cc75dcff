"""Adapter arithmetic (``dt.combine``) and hot-swap on LoRA adapters of fused 3-D expert weights.

peft 0.21's ``add_weighted_adapter`` refuses adapters with ``target_parameters`` (checked below), so
the oracle is dense and per expert, in fp64: each expert ``e`` of the result must be the combination
of expert ``e`` of the members, computed with peft's own ``merge_utils`` functions (task arithmetic,
TIES, DARE, magnitude pruning; DARE's draws aligned by seeding torch's global generator) on the
members' factors (factor methods) or dense ``ΔW_e`` (svd methods, then the best rank-R
approximation, Eckart–Young). Hot-swap: a swap equals a fresh load (another rank and scale within fp32
rounding), keeps the modules and tensors, a padded slot saves each adapter at its own rank (peft
loads it), and a refused swap leaves the model unchanged.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from deltatune.methods.lora_param import ParameterLoraDelta
from deltatune.state import delta_layers
from conftest import TOLERANCES, state_hash
from test_lora_moe import EXPERTS, lora, logits, peft_model, tiny

WEIGHTS = {"a": 0.7, "b": -0.4}
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
PEFT_OPS = {"linear": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
            "magnitude_prune": "magnitude_prune"}


def two_adapters(arch: str = "mixtral", ranks: tuple[int, int] = (2, 3)) -> nn.Module:
    """Adapters "a" (alpha 4) and "b" (alpha 3) on the experts only, random A and B, in fp64."""
    model = tiny(arch)
    for name, r, alpha, seed in (("a", ranks[0], 4, 1), ("b", ranks[1], 3, 2)):
        torch.manual_seed(seed)
        config = dt.LoraConfig(target_modules=[], target_parameters=EXPERTS, r=r, lora_alpha=alpha,
                               init_lora_weights=False)
        dt.attach(model, config, name=name)
    return model.double()


def per_expert(delta: ParameterLoraDelta) -> tuple[Tensor, Tensor, float]:
    """``(B_e, A_e, s)`` from peft's layout as documented: A's rows ``e·r …`` and B's columns ``j·E + e``."""
    experts, r = delta.base.num_experts, delta.r
    b = torch.stack([delta.B.detach()[:, e::experts] for e in range(experts)]).double()
    a = delta.A.detach().reshape(experts, r, -1).double()
    return b, a, delta.scaling


def changes(model: nn.Module, name: str) -> dict[str, ParameterLoraDelta]:
    found = {key: layer.delta(name) for key, layer in delta_layers(model) if name in layer.deltas}
    assert found and all(isinstance(d, ParameterLoraDelta) for d in found.values())
    return found  # type: ignore[return-value]


def result_change(delta: ParameterLoraDelta) -> Tensor:
    """The combined adapter's ``ΔW_e`` as ``(E, out, in)``, from the library's own dense ``ΔW``."""
    dense = delta.delta_weight(delta.base.weight).double()
    return dense.transpose(-2, -1) if delta.base.transposed else dense


def peft_mix(op: str, tensors: list[Tensor], weights: list[float], density: float | None) -> Tensor:
    args: list[Any] = [tensors, torch.tensor(weights, dtype=torch.float64)]
    if op != "linear":
        args.append(density)
    if op in ("ties", "dare_ties"):
        args.append("total")
    return getattr(merge_utils, PEFT_OPS[op])(*args)


def density_for(method: str) -> float | None:
    return None if method in ("linear", "cat", "svd") else 0.5


def test_peft_refuses_to_combine_parameter_adapters() -> None:
    wrapped = peft_model(tiny(), {"first": lora(), "second": lora()})
    with pytest.raises(ValueError, match="does not support targeting nn.Parameter"):
        wrapped.add_weighted_adapter(["first", "second"], [0.7, -0.4], "mix", combination_type="linear")


@pytest.mark.parametrize("method", FACTOR_METHODS)
def test_factor_methods_mix_each_experts_factors_as_peft_mixes_a_layers(method: str) -> None:
    model = two_adapters(ranks=(2, 2))
    members = {n: changes(model, n) for n in WEIGHTS}
    dt.combine(model, WEIGHTS, method, name="mix", density=density_for(method), generator=7)
    torch.manual_seed(7)  # peft's DARE draws from torch's global generator: the same stream as a fresh one seeded 7
    for key, delta in changes(model, "mix").items():  # delta_layers order: the order combine visits them
        factors = [per_expert(members[n][key]) for n in WEIGHTS]
        scaled = [w * s for w, (_, _, s) in zip(WEIGHTS.values(), factors)]
        on_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]
        on_b = [math.sqrt(abs(x)) for x in scaled]
        want = []
        for e in range(delta.base.num_experts):
            a = peft_mix(method, [f[1][e] for f in factors], on_a, density_for(method))
            b = peft_mix(method, [f[0][e] for f in factors], on_b, density_for(method))
            want.append(b @ a)
        assert delta.r == 2 and delta.scaling == 1.0
        torch.testing.assert_close(result_change(delta), torch.stack(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # GPT-OSS stores each expert (in, out)
def test_cat_is_exactly_the_weighted_sum_per_expert_at_the_sum_of_ranks(arch: str) -> None:
    model = two_adapters(arch)
    members = {n: changes(model, n) for n in WEIGHTS}
    dt.combine(model, WEIGHTS, "cat", name="mix")
    for key, delta in changes(model, "mix").items():
        want = sum(w * s * b @ a for w, (b, a, s) in zip(WEIGHTS.values(), (per_expert(members[n][key])
                                                                          for n in WEIGHTS)))
        assert delta.r == 5
        torch.testing.assert_close(result_change(delta), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_svd_methods_keep_each_experts_best_rank_r_approximation(method: str) -> None:
    model = two_adapters()
    members = {n: changes(model, n) for n in WEIGHTS}
    dt.combine(model, WEIGHTS, method, name="mix", density=density_for(method), svd_rank=2, generator=7)
    torch.manual_seed(7)  # the same stream as the seeded generator above, for peft's DARE
    op = method.removesuffix("_svd").replace("svd", "linear")
    for key, delta in changes(model, "mix").items():
        got = result_change(delta)
        for e in range(delta.base.num_experts):
            dense = [s * b[e] @ a[e] for b, a, s in (per_expert(members[n][key]) for n in WEIGHTS)]
            target = peft_mix(op, dense, list(WEIGHTS.values()), density_for(method))
            u, sigma, vh = torch.linalg.svd(target)
            assert torch.linalg.matrix_rank(got[e], atol=1e-6) <= 2
            torch.testing.assert_close(torch.linalg.svdvals(got[e])[:2], sigma[:2], rtol=1e-5, atol=1e-6)
            error = torch.linalg.matrix_norm(target - got[e])
            assert abs(error - sigma[2:].square().sum().sqrt()) <= 1e-5 * sigma[0]  # Eckart–Young: the least error
            torch.testing.assert_close(got[e], u[:, :2] @ torch.diag(sigma[:2]) @ vh[:2], rtol=1e-5, atol=1e-6)


def test_one_adapter_is_reproduced_exactly_and_inverse_norm_weights_each_expert() -> None:
    model = two_adapters()
    dt.combine(model, {"a": 1.0}, "svd", name="alone")
    dt.combine(model, WEIGHTS, "cat", name="even", weighting="inverse_norm")
    members = {n: changes(model, n) for n in WEIGHTS}
    for key, delta in changes(model, "alone").items():
        torch.testing.assert_close(result_change(delta), result_change(members["a"][key]), rtol=1e-6, atol=1e-7)
    for key, delta in changes(model, "even").items():
        dense = [[s * b[e] @ a[e] for e in range(b.shape[0])] for b, a, s in (per_expert(members[n][key])
                                                                                 for n in WEIGHTS)]
        for e, got in enumerate(result_change(delta)):
            norms = [float(torch.linalg.matrix_norm(d[e])) for d in dense]
            lambdas = [w / n / sum(1 / m for m in norms) for w, n in zip(WEIGHTS.values(), norms)]
            torch.testing.assert_close(got, sum(lam * d[e] for lam, d in zip(lambdas, dense)), rtol=1e-5, atol=1e-6)


def test_combined_adapter_runs_saves_and_loads_in_peft(tmp_path: Path) -> None:
    base = tiny()
    model = copy.deepcopy(base)
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        dt.attach(model, dt.LoraConfig(**lora(r=2 + seed, lora_alpha=3 + seed)), name=name)
    dt.combine(model, WEIGHTS, "cat", name="mix")
    dt.set_active(model, "mix")
    got = logits(model)
    # dense reference: the base with every expert weight replaced by W + Σ w_i ΔW_i
    reference = copy.deepcopy(base)
    for key, layer in delta_layers(model):
        view = layer.view
        if not isinstance(layer.delta("mix"), ParameterLoraDelta):
            continue
        total = sum(w * layer.delta(n).delta_weight(view.weight).double() for n, w in WEIGHTS.items())
        target = reference.get_submodule(view.path.rsplit(".", 1)[0])
        with torch.no_grad():
            getattr(target, view.name).add_(total.float())
    q_total = {key: sum(w * layer.delta(n).delta_weight(layer.view.weight) for n, w in WEIGHTS.items())
               for key, layer in delta_layers(model) if not isinstance(layer.delta("mix"), ParameterLoraDelta)}
    for key, total in q_total.items():
        with torch.no_grad():
            reference.get_submodule(key).weight.add_(total)
    assert not torch.allclose(got, logits(base), atol=1e-3)
    torch.testing.assert_close(got, logits(reference), rtol=1e-4, atol=1e-5)

    dt.save(model, tmp_path, names=["mix"])
    assert torch.equal(logits(dt.load(copy.deepcopy(base), tmp_path / "mix")), got)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix").eval()
    assert torch.equal(logits(theirs), got)


@pytest.mark.parametrize(("weights", "method", "options", "words"), [
    (WEIGHTS, "linear", {}, "need one rank"),  # ranks 2 and 3 cannot be mixed entry by entry
    (WEIGHTS, "svd", {"svd_rank": 17}, "rank at most 16"),  # gate_up_proj: 48 x 16 per expert
])
def test_refusals_leave_the_model_unchanged(weights: dict[str, float], method: str, options: dict[str, Any],
                                            words: str) -> None:
    model = two_adapters()
    before = state_hash(model)
    with pytest.raises((dt.AdapterError, dt.ConfigError), match=words):
        dt.combine(model, weights, method, name="mix", **options)
    assert state_hash(model) == before  # no tensor changed and none was added


# ------------------------------------------------------------------------------------ hot-swap

@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of adapters on the experts and q_proj: "a" and "b" (r 2), "wide" (r 3), "small" (r 1,
    another alpha, rsLoRA)."""
    root = tmp_path_factory.mktemp("moe-swap")
    folders = {}
    for name, seed, extra in (("a", 1, {}), ("b", 2, {}), ("wide", 3, {"r": 3}),
                              ("small", 4, {"r": 1, "lora_alpha": 3, "use_rslora": True})):
        base = tiny()  # seeds torch's generator itself
        torch.manual_seed(seed)
        dt.save(dt.attach(base, dt.LoraConfig(**lora(**extra))), root / name)
        folders[name] = root / name
    return folders


def fresh(folder: Path) -> Tensor:
    return logits(dt.load(tiny(), folder))


def test_swap_on_parameter_sites_equals_a_fresh_load(saved: dict[str, Path]) -> None:
    model = dt.load(tiny(), saved["a"])
    modules = [id(m) for m in model.modules()]
    params = dict(model.named_parameters())
    before = logits(model)
    dt.hotswap(model, saved["b"])
    assert not torch.allclose(before, fresh(saved["b"]), atol=1e-3)  # the two adapters differ
    assert torch.equal(logits(model), fresh(saved["b"]))
    assert [id(m) for m in model.modules()] == modules  # no new modules
    assert all(p is params[k] for k, p in model.named_parameters())  # the same tensors, written in place
    dt.hotswap(model, saved["small"])  # a smaller rank (zeros after each expert's), another scale
    torch.testing.assert_close(logits(model), fresh(saved["small"]), **TOLERANCES[torch.float32])
    assert all(p is params[k] for k, p in model.named_parameters())


def test_prepared_slots_take_larger_ranks_and_save_each_adapter_at_its_rank(saved: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    model = dt.load(tiny(), saved["a"])
    dt.prepare_hotswap(model, target_rank=3)  # each expert's rank axis padded with zeros; scales in tensors
    torch.testing.assert_close(logits(model), fresh(saved["a"]), **TOLERANCES[torch.float32])
    dt.save(model, tmp_path / "a")
    written, original = (load_file(f / "adapter_model.safetensors") for f in (tmp_path / "a", saved["a"]))
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    for name in ("wide", "small", "a"):
        dt.hotswap(model, saved[name])
        torch.testing.assert_close(logits(model), fresh(saved[name]), **TOLERANCES[torch.float32])
    dt.hotswap(model, saved["small"])
    dt.save(model, tmp_path / "small")
    theirs = peft.PeftModel.from_pretrained(tiny(), tmp_path / "small").eval()  # rank 1 again, in peft's layout
    torch.testing.assert_close(logits(theirs), fresh(saved["small"]), **TOLERANCES[torch.float32])


def test_a_larger_rank_into_an_unprepared_slot_is_refused_and_changes_nothing(saved: dict[str, Path]) -> None:
    model = dt.load(tiny(), saved["a"], trainable=True)
    dt.prepare_hotswap(model, target_rank=2)  # scales held in tensors; no padding
    before = state_hash(model)
    with pytest.raises(dt.AdapterFileError, match=r"prepare_hotswap\(model, target_rank=3\)"):
        dt.hotswap(model, saved["wide"])
    assert state_hash(model) == before


def test_padded_slots_combine_at_their_adapters_ranks() -> None:
    plain, padded = two_adapters(), two_adapters()
    dt.prepare_hotswap(padded, target_rank=4)  # zero ranks after each expert's own: no part of the adapters
    for model in (plain, padded):
        dt.combine(model, WEIGHTS, "cat", name="mix")
    for (key, got), want in zip(changes(padded, "mix").items(), changes(plain, "mix").values()):
        assert got.r == want.r == 5, key
        assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)


def test_compiled_moe_model_does_not_recompile_across_swaps(saved: dict[str, Path]) -> None:
    """A rank-2 adapter in slots padded to 3, compiled (dynamo, eager backend); rank 3, rank 1 (another
    alpha, rsLoRA) and rank 2 go in: the frame count stays, outputs as fresh loads."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = dt.load(tiny(), saved["a"])
    dt.prepare_hotswap(model, target_rank=3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    logits(compiled)
    frames = counter.frame_count
    assert frames >= 1
    for name in ("wide", "small", "a"):
        dt.hotswap(compiled, saved[name])
        torch.testing.assert_close(logits(compiled), fresh(saved[name]), **TOLERANCES[torch.float32])
    assert counter.frame_count == frames
    torch._dynamo.reset()
