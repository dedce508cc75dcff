"""Composition as data: exact semantics of every composition on weight-space layers, against a
dense fp64 oracle written here from the papers' formulas, in every order of the members."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.layer import DeltaLayer



@pytest.fixture(autouse=True)
def _fp64() -> object:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)




def layer_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5)).double()


def randomize(model: nn.Module, seed: int) -> None:
    """Every adapter tensor random, so no member is at its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad or "deltas" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5 + 
                            (1.0 if "ia3_l" in name or "magnitude" in name else 0.0))


def mixed_model() -> nn.Module:
    """LoRA, DoRA, IA3 (output scaling), IA3 (input scaling) and two BitFit adapters on one layer."""
    model = layer_model()
    dt.attach(model, dt.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False), name="lora")
    dt.attach(model, dt.LoraConfig(r=3, lora_alpha=2, target_modules=["0"], use_dora=True,
                                   init_lora_weights=False), name="dora")
    dt.attach(model, dt.IA3Config(target_modules=["0"], feedforward_modules=[]), name="ia3")
    dt.attach(model, dt.IA3Config(target_modules=["0"], feedforward_modules=["0"]), name="ia3ff")
    dt.attach(model, dt.BitFitConfig(target_modules=["0"]), name="bit1")
    dt.attach(model, dt.BitFitConfig(target_modules=["0"]), name="bit2")
    randomize(model, 1)
    return model


def oracle_change(model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW, Δb) of adapter ``name`` on the base (W, b), from the method's formula."""
    layer = model[0]
    if name.startswith("bit"):
        part = dt.adapters.state_of(model).model_deltas[name]
        return torch.zeros_like(weight), part.biases[0].detach() - bias
    delta = layer.deltas[name]
    if name == "lora":
        return delta.scaling * delta.B.detach() @ delta.A.detach(), torch.zeros_like(bias)
    if name == "dora":
        direction = weight + delta.scaling * delta.B.detach() @ delta.A.detach()
        norm = direction.norm(dim=1, keepdim=True)
        return delta.magnitude.detach()[:, None] * direction / norm - weight, torch.zeros_like(bias)
    scale = delta.ia3_l.detach().flatten()
    if name == "ia3":  # y * l: W' = diag(l) W, b' = l * b
        return (scale[:, None] - 1) * weight, (scale - 1) * bias
    return weight * (scale[None, :] - 1), torch.zeros_like(bias)  # ia3ff: W' = W diag(l)


def oracle_output(model: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    base = model[0].base_layer if isinstance(model[0], DeltaLayer) else model[0]
    weight, bias = base.weight.detach(), dt.adapters.state_of(model).model_deltas["bit1"]._trained[0].base
    changes = [oracle_change(model, n, weight, bias) for n in names]
    return x @ (weight + sum(c[0] for c in changes)).T + bias + sum(c[1] for c in changes)


NAMES = ("lora", "dora", "ia3", "ia3ff", "bit1", "bit2")


@pytest.mark.parametrize("size", [1, 2, 3])
def test_sum_of_mixed_methods_is_order_free_and_exact(size: int) -> None:
    model = mixed_model()
    x = torch.randn(4, 6)
    for names in itertools.permutations(NAMES, size):
        dt.set_active(model, list(names))
        with torch.no_grad():
            got = model(x)
        torch.testing.assert_close(got, oracle_output(model, names, x), atol=1e-10, rtol=1e-10, msg=str(names))


def test_sum_of_all_six_in_two_orders() -> None:
    model = mixed_model()
    x = torch.randn(4, 6)
    outputs = []
    for names in (NAMES, tuple(reversed(NAMES))):
        dt.set_active(model, dt.Sum(*names))
        with torch.no_grad():
            outputs.append(model(x))
        torch.testing.assert_close(outputs[-1], oracle_output(model, names, x), atol=1e-10, rtol=1e-10)


def test_bitfit_plus_bitfit_adds_and_trains_both() -> None:
    model = mixed_model()
    dt.set_active(model, ["bit2", "bit1"])
    x = torch.randn(4, 6)
    model(x).sum().backward()
    state = dt.adapters.state_of(model)
    for name in ("bit1", "bit2"):
        grad = state.model_deltas[name].biases[0].grad
        assert grad is not None and torch.equal(grad, torch.full((5,), 4.0)), name
    assert isinstance(model[0].base_layer.bias, nn.Parameter)  # put back after the call
    with dt.disabled(model), torch.no_grad():
        torch.testing.assert_close(model(x), x @ model[0].base_layer.weight.T + model[0].base_layer.bias)


@pytest.mark.parametrize("names", [("lora", "ia3"), ("ia3", "lora"), ("dora", "ia3ff", "lora"), ("ia3", "ia3ff")])
def test_merged_sum_equals_oracle_and_unmerges(names: tuple[str, ...]) -> None:
    """Merging computes ΔW in fp32 (merge.py), so the fp64 model agrees with the oracle to fp32
    rounding: a few operations of relative error 2^-24 on values of order 1 (1e-6 is 16 ulps)."""
    model = mixed_model()
    x = torch.randn(4, 6)
    base = model[0].base_layer
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    dt.set_active(model, list(names))
    want = oracle_output(model, names, x)
    dt.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
    dt.unmerge(model)
    torch.testing.assert_close(base.weight.detach(), weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base.bias.detach(), bias, atol=1e-6, rtol=1e-6)


def lora_pair() -> nn.Module:
    model = layer_model()
    for name, rank in (("a", 2), ("b", 3)):
        dt.attach(model, dt.LoraConfig(r=rank, target_modules=["0"], init_lora_weights=False), name=name)
    randomize(model, 2)
    return model


def lora_out(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    dt.set_active(model, name)
    with torch.no_grad():
        return model(x)


def test_average_weights_the_members_outputs() -> None:
    model = lora_pair()
    x = torch.randn(4, 6)
    a, b = lora_out(model, "a", x), lora_out(model, "b", x)
    dt.set_active(model, dt.Average("a", "b", weights=[0.3, 0.7]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), 0.3 * a + 0.7 * b, atol=1e-12, rtol=1e-12)
    dt.set_active(model, dt.Average("a", "b"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), 0.5 * a + 0.5 * b, atol=1e-12, rtol=1e-12)


def test_batch_split_gives_each_member_its_rows() -> None:
    model = lora_pair()
    x = torch.randn(5, 6)
    a, b = lora_out(model, "a", x), lora_out(model, "b", x)
    dt.set_active(model, dt.BatchSplit("a", "b", sizes=[2, 3]))
    with torch.no_grad():
        assert torch.equal(model(x), torch.cat([a[:2], b[2:]]))
    with pytest.raises(dt.AdapterError, match="add up to 5 rows but the batch has 4"):
        model(x[:4])


def test_stack_of_weight_deltas_is_refused_and_merge_needs_a_sum() -> None:
    model = lora_pair()
    dt.set_active(model, dt.Stack("a", "b"))
    with pytest.raises(dt.AdapterError, match="Stack.*weight-space"):
        model(torch.randn(2, 6))
    dt.set_active(model, dt.Average("a", "b"))
    weight = model[0].base_layer.weight.detach().clone()
    with pytest.raises(dt.AdapterError, match="not a plain sum"):
        dt.merge(model)
    assert torch.equal(model[0].base_layer.weight, weight)


def test_layers_hold_the_composition_by_reference() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5)).double()
    for name in ("a", "b"):
        dt.attach(model, dt.LoraConfig(r=2, target_modules=["0", "1"]), name=name)
    state = dt.adapters.state_of(model)
    assert all(layer.active_set is state.active_set for layer in (model[0], model[1]))
    dt.set_active(model, dt.BatchSplit("a", "b", sizes=[1, 1]))
    assert model[1].active_set.composition == dt.BatchSplit("a", "b", sizes=[1, 1])


def test_deleting_a_member_keeps_the_rest_of_the_composition() -> None:
    model = lora_pair()
    dt.attach(model, dt.LoraConfig(r=1, target_modules=["0"]), name="c")
    dt.set_active(model, dt.BatchSplit("a", dt.Sum("b", "c"), sizes=[1, 2]))
    dt.delete_adapter(model, "b")
    assert dt.adapters.state_of(model).active_set.composition == dt.BatchSplit("a", dt.Sum("c"), sizes=[1, 2])
    dt.delete_adapter(model, "a")
    assert dt.adapters.state_of(model).active_set.composition == dt.BatchSplit(dt.Sum("c"), sizes=[2])


@pytest.mark.parametrize("bad", [lambda: dt.Sum(), lambda: dt.Sum("a", 3), lambda: dt.BatchSplit("a", sizes=[1, 2]),
                                 lambda: dt.BatchSplit("a", sizes=[-1]), lambda: dt.Average("a", "b", weights=[1.0])])
def test_invalid_compositions_are_clear_errors(bad: object) -> None:
    with pytest.raises(dt.AdapterError, match="e.g."):
        bad()  # type: ignore[operator]


def test_unknown_or_repeated_names_change_nothing() -> None:
    model = lora_pair()
    dt.set_active(model, ["a", "b"])
    with pytest.raises(dt.AdapterError, match="'zz'"):
        dt.set_active(model, dt.Stack("a", "zz"))
    with pytest.raises(dt.AdapterError, match="repeat"):
        dt.set_active(model, dt.BatchSplit("a", "a", sizes=[1, 1]))
    assert dt.adapters.state_of(model).active_set.composition == dt.Sum("a", "b")


def test_merging_ia3_with_bitfit_active_keeps_bitfits_copy_and_the_sum() -> None:
    """The base bias is never replaced by BitFit's copy, so a merge writes into the true base bias:
    BitFit's trained copy (what a save writes) stays as it was, and outputs still follow the sum."""
    model = mixed_model()
    state = dt.adapters.state_of(model)
    copy = state.model_deltas["bit1"].biases[0]
    trained = copy.detach().clone()
    x = torch.randn(4, 6)
    dt.set_active(model, ["ia3", "bit1"])
    want = oracle_output(model, ("ia3", "bit1"), x)
    dt.merge(model)
    assert torch.equal(copy, trained)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)  # fp32 merge (see above)


def test_parallel_repeats_the_batch_once_per_member() -> None:
    model = lora_pair()
    x = torch.randn(3, 6)
    a, b = lora_out(model, "a", x), lora_out(model, "b", x)
    dt.set_active(model, dt.Parallel("a", "b"))
    with torch.no_grad():
        out = model(x)
        with dt.disabled(model):
            base = model(x)
    assert out.shape[0] == 6 and torch.equal(out, torch.cat([a, b]))
    assert base.shape[0] == 3  # switched off, nothing is repeated
    dt.set_active(model, "a")
    with torch.no_grad():
        assert torch.equal(model(x), a)  # and the repetition is gone with the Parallel


def test_parallel_only_at_the_top() -> None:
    model = lora_pair()
    with pytest.raises(dt.AdapterError, match="outermost"):
        dt.set_active(model, dt.Average(dt.Parallel("a"), "b"))
