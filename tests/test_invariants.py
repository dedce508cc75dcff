"""The invariant battery (DESIGN principle 9): every method on every base kind it adapts, in fp32
and bf16, passes the same checks. What a method is and does comes from the table in
battery_cases.py (config, kinds, fp64 formula, parameter count, capabilities); nothing here names
a method.

Per (method, kind, dtype):

1. the identity init is the identity (bit for bit: the adapter adds exact zeros or multiplies by
   exactly one on the base layer's own operation; DoRA's fused kernel up to one rounding), for
   every identity-keeping variant of the config; a method whose init is not the identity by design
   (LoftQ) matches its init's fp64 formula instead (``Method.init``);
2. with random trained tensors the output matches the dense fp64 oracle (the base layer with the
   weight and bias of the method's formula);
3. merged output == unmerged output (on a 4-bit base, the dense model of ``unload(merge=True)``),
   and merging twice changes nothing;
4. unmerge restores the weights within ``restore_bound`` (keeping the Parameter objects), a bias
   that merging does not change stays bit for bit, and the unmerged model computes what a
   never-merged copy computes on the restored weights;
5. save -> load into a fresh base gives identical outputs and tensors, frozen (trainable on request);
6. ``dt.disabled`` gives the base output, also while merged (then it runs the base on the
   unmerged weights), and the adapter comes back after the block, also after an exception;
7. trainable parameters == the method's formula, trained in fp32 on a bf16 base (BitFit trains
   the base's own biases, in their dtype); a backward pass reaches exactly those tensors;
8. failed calls leave the model bit for bit unchanged: attaching to a kind the method does not
   adapt, attaching with a setting the method refuses (``Method.refused``), loading a file with a
   tensor of the wrong shape (into a fresh base and next to an adapter), attaching under a taken
   name, merging in place on a 4-bit base;
9. peft cross-load, both ways, gives equal outputs where peft has the method (dense kinds).

"The base" is the base as the method's attach leaves it (``Method.start``: LoftQ's NF4 round trip).

Per pair of methods on one layer (each pair once, a method with itself too, both of one
``Method.site``), per kind and dtype:

10. ``Sum(a, b)`` == ``Sum(b, a)`` == ``base + (out_a - base) + (out_b - base)``;
11. ``BatchSplit`` rows equal the single adapters' outputs on those rows, in both orders.

Outputs computed by different code paths are compared with ``conftest.close`` (TOLERANCES, one row
per dtype); ``torch.equal`` only where the same operations run on the same values.
"""

from __future__ import annotations

import copy
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import deltatune as dt
from battery_cases import (DTYPES, KINDS, METHODS, Kind, Method, adapted, base_module, build, canonical_weight,
                           dense_copy, make_input, randomize, randomize_peft, restore_bound, run, starting_base,
                           weight_rounding_bound)
from conftest import TOLERANCES, close, state_hash
from deltatune.io import adapter_tensors
from deltatune.layer import DeltaLayer
from deltatune.quant.model import packed_weight_values

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """conftest's seed, on the CPU generator only (see ``battery_cases.build``: ``torch.manual_seed``
    records stack traces for lazy device seeding, a few ms per call over 1,500 cases)."""
    torch.default_generator.manual_seed(1234)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cases(where: Callable[[Method, Kind], bool] = lambda m, k: True) -> list[Any]:
    """(method, kind, dtype) for every kind the method adapts; ``where(method, kind)`` narrows it."""
    return [pytest.param(m, k, d, id=f"{m.name}-{k.name}-{_dtype_id(d)}")
            for m in METHODS for k in KINDS if k.name in m.kinds and where(m, k) for d in DTYPES]


ALL = cases()
IN_PLACE = cases(lambda m, k: not k.quantized)  # a 4-bit weight cannot take a merge in place
PEFT = cases(lambda m, k: m.peft is not None and k.peft_runs and not k.quantized)
VARIANTS = [pytest.param(m, k, d, v, id=f"{m.name}-{k.name}-{_dtype_id(d)}-{v}")
            for m in METHODS for k in KINDS if k.name in m.kinds for d in DTYPES for v in m.variants]
UNSUPPORTED = [pytest.param(m, k, id=f"{m.name}-{k.name}") for m in METHODS for k in KINDS if k.name not in m.kinds]
REFUSED = [pytest.param(m, k, s, id=f"{m.name}-{k.name}-{s}") for m in METHODS for k in KINDS if k.name in m.kinds
           for s in m.refused]
PAIRS = [pytest.param(a, b, k, d, id=f"{a.name}+{b.name}-{k.name}-{_dtype_id(d)}")
         for a, b in itertools.combinations_with_replacement(METHODS, 2) if a.site == b.site
         for k in KINDS if k.name in a.kinds and k.name in b.kinds for d in DTYPES]


def assert_close(a: Tensor, b: Tensor, dtype: torch.dtype, what: str) -> None:
    __tracebackhide__ = True  # failure reports show the check, not this helper and its tensors
    if not close(a, b, dtype):
        err = (a.double() - b.double()).abs().max().item()
        raise AssertionError(f"{what}: max abs error {err:.3g} exceeds {TOLERANCES[dtype]}")


def assert_changes(out: Tensor, base_out: Tensor, dtype: torch.dtype) -> None:
    __tracebackhide__ = True
    if close(out, base_out, dtype):
        raise AssertionError("the adapter does not change the output: the check would prove nothing")


def assert_restored(restored: Tensor, original: Tensor, merged: Tensor, gain: Tensor | float,
                    dtype: torch.dtype, what: str) -> None:
    """``restored`` within ``restore_bound`` of ``original`` (canonical layout)."""
    __tracebackhide__ = True
    err = (restored.double() - original.double()).abs()
    bound = restore_bound(original.double(), merged.double(), gain, dtype)
    if not (err <= bound).all():
        worst = (err / bound.clamp_min(1e-300)).max().item()
        raise AssertionError(f"{what}: unmerge error up to {worst:.3g} x the rounding bound")


def weights(kind: Kind, model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The base layer's weight (canonical) and bias, as clones in their stored dtype."""
    module = base_module(model)
    bias = getattr(module, "bias", None)
    return kind.canonical(module.weight).detach().clone(), None if bias is None else bias.detach().clone()


def copy_base(kind: Kind, source: nn.Module, target: nn.Module) -> None:
    """Copy the base weight and bias of ``source`` into ``target``'s base layer."""
    weight, bias = weights(kind, source)
    module = base_module(target)
    with torch.no_grad():
        module.weight.copy_(kind.canonical(weight))
        if bias is not None:
            module.bias.copy_(bias)


def merged_names(model: nn.Module) -> list[str]:
    return model.layer.merged if isinstance(model.layer, DeltaLayer) else []


# ------------------------------------------------------------------------------- one adapter

@pytest.mark.parametrize(("method", "kind", "dtype", "variant"), VARIANTS)
def test_identity_init(method: Method, kind: Kind, dtype: torch.dtype, variant: str) -> None:
    x = make_input(kind, dtype)
    base_out = run(build(kind, dtype), x)
    out = run(adapted(method, kind, dtype, random=False, **method.variants[variant]), x)
    assert out.dtype == base_out.dtype
    if method.init is not None:  # not the identity by design: the init's own formula
        oracle = dense_copy(base_module(build(kind, dtype)))
        weight = method.init(canonical_weight(kind, oracle), dtype, method.config(**method.variants[variant]))
        with torch.no_grad():
            oracle.weight.copy_(kind.canonical(weight))
        assert_close(out, run(oracle, x.double() if x.is_floating_point() else x), dtype, "init vs its fp64 formula")
    elif method.fused_identity_rounds and kind.dense_linear and dtype == torch.float32:
        assert_close(out, base_out, dtype, "identity init vs base output")
    else:
        assert torch.equal(out, base_out)


@pytest.mark.parametrize(("method", "kind", "dtype", "variant"), VARIANTS)
def test_matches_dense_oracle(method: Method, kind: Kind, dtype: torch.dtype, variant: str) -> None:
    x = make_input(kind, dtype)
    changes = method.variants[variant]
    model = adapted(method, kind, dtype, **changes)
    oracle = dense_copy(base_module(starting_base(method, kind, dtype)))
    bias = getattr(oracle, "bias", None)
    original = canonical_weight(kind, oracle).clone()  # the fp64 oracle's weight itself: .double() is no copy
    weight, new_bias = method.oracle(model, method.config(**changes), original, None if bias is None else bias.detach())
    dense = copy.deepcopy(oracle)
    with torch.no_grad():
        oracle.weight.copy_(kind.canonical(weight))
        if new_bias is not None:
            oracle.bias.copy_(new_bias)
    out = run(model, x)
    assert out.dtype == run(build(kind, dtype), x).dtype
    assert_changes(out, run(build(kind, dtype), x), dtype)
    expected = run(oracle, x.double() if x.is_floating_point() else x)
    if method.site == "parameter":  # W + ΔW in the base's dtype (Method.site)
        err = (out.double() - expected).abs()
        magnitude = original.abs() + (weight - original).abs()
        bound = weight_rounding_bound(dense, kind, magnitude, x, expected.abs(), dtype)
        worst = (err / bound).max().item()
        assert (err <= bound).all(), f"output vs dense fp64 oracle: up to {worst:.3g} x the rounding bound"
    else:
        assert_close(out, expected, dtype, "output vs dense fp64 oracle")


@pytest.mark.parametrize(("method", "kind", "dtype"), ALL)
def test_merged_equals_unmerged(method: Method, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = adapted(method, kind, dtype)
    unmerged = run(model, x)
    if kind.quantized:  # the merge a 4-bit base allows: a dense layer with the merged weight
        plain = dt.unload(model, merge=True)
        assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
        assert_close(run(plain, x), unmerged, dtype, "unload(merge=True) vs unmerged output")
        return
    dt.merge(model)
    assert merged_names(model) == (["default"] if method.layer_delta else [])
    assert_close(run(model, x), unmerged, dtype, "merged vs unmerged output")
    weight, _ = weights(kind, model)
    dt.merge(model)  # merging twice is a no-op
    assert torch.equal(weights(kind, model)[0], weight)


@pytest.mark.parametrize(("method", "kind", "dtype"), IN_PLACE)
def test_unmerge_restores_weights(method: Method, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = adapted(method, kind, dtype)
    twin = copy.deepcopy(model)
    module = base_module(model)
    parameters = (module.weight, getattr(module, "bias", None))
    w0, b0 = weights(kind, model)
    dt.merge(model)
    w1, b1 = weights(kind, model)
    if method.layer_delta:
        assert not torch.equal(w1, w0), "merging should change the weight"
    dt.unmerge(model)
    w2, b2 = weights(kind, model)
    assert merged_names(model) == []
    assert (base_module(model).weight, getattr(base_module(model), "bias", None)) == parameters, \
        "the Parameter objects must be kept (ties, optimizers)"
    gain = 1.0 if method.gain is None else method.gain(model, method.config(), w0.double())
    assert_restored(w2, w0, w1, gain, dtype, "weight")
    if b0 is not None:
        assert b1 is not None and b2 is not None
        if method.merges_bias:  # the bias change is recorded at merge time and subtracted: gain 1
            assert not torch.equal(b1, b0)
            assert_restored(b2, b0, b1, 1.0, dtype, "bias")
        else:
            assert torch.equal(b1, b0) and torch.equal(b2, b0), "a merge that does not change the bias must leave it alone"
    # unmerged, the model computes what the never-merged copy computes on the same weights
    copy_base(kind, model, twin)
    assert torch.equal(run(model, x), run(twin, x))


@pytest.mark.parametrize(("method", "kind", "dtype"), ALL)
def test_save_load_roundtrip(method: Method, kind: Kind, dtype: torch.dtype, tmp_path: Path) -> None:
    x = make_input(kind, dtype)
    model = adapted(method, kind, dtype)
    out = run(model, x)
    dt.save(model, tmp_path)
    fresh = dt.load(build(kind, dtype), tmp_path)
    assert torch.equal(run(fresh, x), out)
    mine, theirs = adapter_tensors(fresh, "default"), adapter_tensors(model, "default")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(p.requires_grad for p in fresh.parameters()), "dt.load freezes the adapter by default"
    trainable = dt.load(build(kind, dtype), tmp_path, trainable=True)
    assert dt.trainable_parameters(trainable)[0] == method.count(kind)


@pytest.mark.parametrize(("method", "kind", "dtype"), ALL)
def test_disabled_gives_base_output(method: Method, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    base_out = run(starting_base(method, kind, dtype), x)
    model = adapted(method, kind, dtype)
    out = run(model, x)
    assert_changes(out, base_out, dtype)
    with dt.disabled(model):
        assert torch.equal(run(model, x), base_out)
    assert torch.equal(run(model, x), out)
    if kind.quantized:
        return
    dt.merge(model)
    merged_out = run(model, x)
    w0, _ = weights(kind, starting_base(method, kind, dtype))
    w1, _ = weights(kind, model)
    with dt.disabled(model):
        assert merged_names(model) == []
        gain = 1.0 if method.gain is None else method.gain(model, method.config(), w0.double())
        assert_restored(weights(kind, model)[0], w0, w1, gain, dtype, "weight inside dt.disabled")
        plain = build(kind, dtype)  # the base layer alone, on the weights as unmerged
        copy_base(kind, model, plain)
        assert torch.equal(run(model, x), run(plain, x))
        if dtype == torch.float32:  # bf16: the unmerged weight is the base only up to restore_bound
            assert_close(run(model, x), base_out, dtype, "disabled while merged vs base output")
    assert merged_names(model) == (["default"] if method.layer_delta else []), "the merge comes back after the block"
    if dtype == torch.float32:
        assert_close(run(model, x), merged_out, dtype, "merged output after the block")
    with pytest.raises(RuntimeError, match="inside"), dt.disabled(model):
        raise RuntimeError("inside")
    assert merged_names(model) == (["default"] if method.layer_delta else [])
    assert not isinstance(model.layer, DeltaLayer) or model.layer.enabled
    if dtype == torch.float32:
        assert_close(run(model, x), merged_out, dtype, "merged output after an exception in the block")


@pytest.mark.parametrize(("method", "kind", "dtype"), ALL)
def test_trainable_count_and_dtype(method: Method, kind: Kind, dtype: torch.dtype) -> None:
    base = build(kind, dtype)
    base_total = sum(p.numel() for p in base.parameters()) + packed_weight_values(base)  # a 4-bit weight: its values
    model = adapted(method, kind, dtype, random=False)
    count = method.count(kind)
    assert dt.trainable_parameters(model) == (count, base_total + count)
    assert dt.adapter_parameters(model, "default") == count
    trained = [p for p in model.parameters() if p.requires_grad]
    if method.trains_base_tensors:  # copies of the base's own biases, in their dtype
        assert all(p.dtype == base_module(base).bias.dtype for p in trained)
    else:  # on a half-precision base, adapters are kept in fp32 (peft's autocast_adapter_dtype)
        assert all(p.dtype == torch.float32 for p in trained)
    x = make_input(kind, dtype)
    assert run(model, x).dtype == run(base, x).dtype
    assert base_module(model).weight.dtype == base_module(base).weight.dtype


@pytest.mark.parametrize(("method", "kind", "dtype"), ALL)
def test_backward_reaches_only_the_adapter(method: Method, kind: Kind, dtype: torch.dtype) -> None:
    model = adapted(method, kind, dtype).train()
    model(make_input(kind, dtype)).float().square().mean().backward()
    trained = {id(t) for t in adapter_tensors(model, "default").values() if isinstance(t, nn.Parameter)}
    assert trained
    for name, param in model.named_parameters():
        if id(param) in trained:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
            assert param.grad.dtype == param.dtype, name
        else:
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize(("method", "kind", "dtype"), ALL)
def test_failed_calls_leave_the_model_unchanged(method: Method, kind: Kind, dtype: torch.dtype,
                                                tmp_path: Path) -> None:
    x = make_input(kind, dtype)
    model = adapted(method, kind, dtype)
    out = run(model, x)
    dt.save(model, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])  # one row (or entry) too many
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")
    shutil.copy(tmp_path / "good" / "adapter_config.json", tmp_path / "bad")

    fresh = build(kind, dtype)
    before = state_hash(fresh)
    with pytest.raises(dt.DeltatuneError):
        dt.load(fresh, tmp_path / "bad")
    assert state_hash(fresh) == before and "deltatune_state" not in fresh.__dict__

    before = state_hash(model)
    with pytest.raises(dt.DeltatuneError):
        dt.load(model, tmp_path / "bad", name="other")
    with pytest.raises(dt.AdapterError):
        dt.attach(model, method.config(), name="default")
    if kind.quantized and method.layer_delta:
        with pytest.raises(dt.QuantError):
            dt.merge(model)
        assert merged_names(model) == []
    assert state_hash(model) == before and dt.adapter_names(model) == ["default"]
    assert torch.equal(run(model, x), out)


@pytest.mark.parametrize(("method", "kind"), UNSUPPORTED)
def test_unsupported_kind_is_refused_unchanged(method: Method, kind: Kind) -> None:
    model = build(kind, torch.float32)
    layer, before = model.layer, state_hash(model)
    with pytest.raises(dt.TargetError):
        dt.attach(model, method.config())
    assert model.layer is layer and state_hash(model) == before and "deltatune_state" not in model.__dict__


@pytest.mark.parametrize(("method", "kind", "setting"), REFUSED)
def test_refused_setting_leaves_the_base_unchanged(method: Method, kind: Kind, setting: str) -> None:
    model = build(kind, torch.float32)
    layer, before = model.layer, state_hash(model)
    with pytest.raises((dt.ConfigError, dt.TargetError)):
        dt.attach(model, method.config(**method.refused[setting]))
    assert model.layer is layer and state_hash(model) == before and "deltatune_state" not in model.__dict__


@pytest.mark.parametrize(("method", "kind", "dtype"), PEFT)
def test_peft_cross_load(method: Method, kind: Kind, dtype: torch.dtype, tmp_path: Path) -> None:
    import peft

    x = make_input(kind, dtype)
    base_out = run(build(kind, dtype), x)
    theirs = peft.get_peft_model(build(kind, dtype), method.peft_config())
    randomize_peft(theirs, method)
    theirs.eval().save_pretrained(tmp_path / "peft")
    want = run(theirs, x)
    assert_changes(want, base_out, dtype)
    assert_close(run(dt.load(build(kind, dtype), tmp_path / "peft"), x), want, dtype, "peft -> deltatune")

    ours = adapted(method, kind, dtype)
    dt.save(ours, tmp_path / "dt")
    back = peft.PeftModel.from_pretrained(build(kind, dtype), tmp_path / "dt").eval()
    assert_close(run(back, x), run(ours, x), dtype, "deltatune -> peft")


# ------------------------------------------------------------------------------ compositions

def pair(a: Method, b: Method, kind: Kind, dtype: torch.dtype) -> nn.Module:
    """``a`` attached as "a" and ``b`` as "b" on one layer, both random (each with its own noise)."""
    model = build(kind, dtype)
    dt.attach(model, a.config(), name="a")
    dt.attach(model, b.config(), name="b")
    randomize(model, "a", a, seed=1)
    randomize(model, "b", b, seed=2)
    return model


def output(model: nn.Module, x: Tensor, active: str | dt.Composition) -> Tensor:
    dt.set_active(model, active)
    return run(model, x)


@pytest.mark.parametrize(("a", "b", "kind", "dtype"), PAIRS)
def test_sum_is_order_free_and_adds_the_changes(a: Method, b: Method, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = pair(a, b, kind, dtype)
    with dt.disabled(model):
        base = run(model, x)
    out_a, out_b = output(model, x, "a"), output(model, x, "b")
    assert_changes(out_a, base, dtype)
    assert_changes(out_b, base, dtype)
    ab, ba = output(model, x, dt.Sum("a", "b")), output(model, x, dt.Sum("b", "a"))
    expected = base.double() + (out_a.double() - base.double()) + (out_b.double() - base.double())
    if a.site == "parameter":  # W + ΔW_a + ΔW_b in the base's dtype (Method.site): its rounding bound
        dense = dense_copy(base_module(model))
        weight = canonical_weight(kind, base_module(model))
        changes = [kind.canonical(model.layer.deltas[n].delta_weight(weight.float()).double()) for n in ("a", "b")]
        magnitude = weight.abs() + changes[0].abs() + changes[1].abs()
        outputs = sum(t.double().abs() for t in (ab, ba, out_a, out_b, base))
        # Sum(a, b) and Sum(b, a): two casts and two sums each; out_a, out_b: a cast and a sum each
        bound = weight_rounding_bound(dense, kind, magnitude, x, outputs, dtype, roundings=12, paths=5)
        for got, want, what in ((ab, ba, "Sum(a, b) vs Sum(b, a)"),
                                (ab, expected, "Sum(a, b) vs base + (out_a - base) + (out_b - base)")):
            err = (got.double() - want.double()).abs()
            assert (err <= bound).all(), f"{what}: up to {(err / bound).max():.3g} x the rounding bound"
        return
    assert_close(ab, ba, dtype, "Sum(a, b) vs Sum(b, a)")
    assert_close(ab, expected, dtype, "Sum(a, b) vs base + (out_a - base) + (out_b - base)")


@pytest.mark.parametrize(("a", "b", "kind", "dtype"), PAIRS)
def test_batch_split_rows_equal_single_adapters(a: Method, b: Method, kind: Kind, dtype: torch.dtype) -> None:
    x = make_input(kind, dtype)
    model = pair(a, b, kind, dtype)
    single = {name: output(model, x, name) for name in ("a", "b")}
    rows = x.shape[0]
    first = rows // 2
    for names in (("a", "b"), ("b", "a")):
        split = output(model, x, dt.BatchSplit(*names, sizes=[first, rows - first]))
        assert_close(split[:first], single[names[0]][:first], dtype, f"BatchSplit{names}: rows of {names[0]!r}")
        assert_close(split[first:], single[names[1]][first:], dtype, f"BatchSplit{names}: rows of {names[1]!r}")
