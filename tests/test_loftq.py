"""LoftQ init (``init_lora_weights="loftq"``): equal to peft 0.21's ``loftq_init`` (which quantizes with
bitsandbytes) bit for bit, on one matrix and through ``get_peft_model`` on a tiny LLaMA; the
refusals; and the composition with ``dt.quantize`` (QLoRA + LoftQ): the 4-bit base holds LoftQ's
Q and the adapter its A and B. peft and bitsandbytes are only imported here, as test oracles.

peft's ``loftq_init`` moves the weight to "cuda" (or "xpu") to quantize it; on a machine without
one, ``cpu_for_cuda`` routes those moves to the CPU, where bitsandbytes 0.50 quantizes too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import bitsandbytes.functional as bnb_functional
from peft.utils.loftq_utils import loftq_init
from torch import Tensor, nn

import deltatune as dt
from conftest import close, lm_losses, outputs, state_hash, tiny_llama, token_ids
from deltatune.layer import DeltaLayer
from deltatune.methods.lora_loftq import loftq_factors, nf4_round_trip
from deltatune.quant import Linear4bit, quantize_4bit

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _is_cuda(device: object) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda")


@pytest.fixture
def cpu_for_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``Tensor.to("cuda")`` goes to the CPU while the test runs (see the module docstring)."""
    if torch.cuda.is_available():
        yield
        return
    to = torch.Tensor.to

    def to_cpu(self: Tensor, *args: Any, **kwargs: Any) -> Any:
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_cpu)
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", table_dequantize_4bit)
    yield


def table_dequantize_4bit(packed: Tensor, state: Any, *args: Any, **kwargs: Any) -> Tensor:
    """bitsandbytes' NF4 dequantization as its definition (code -> NF4 table value x the block's absmax),
    for peft's LoftQ on the CPU: bitsandbytes 0.50.2's CPU dequantize_4bit kernel gave wrong values on
    one machine (identical codes and absmax, values off by up to 1.55), so the oracle must not rest
    on which CPU kernel a machine picks. The codes and absmax stay bitsandbytes' own."""
    assert state.nested is False and state.quant_type == "nf4", "only what peft's LoftQ asks for"
    table = bnb_functional.get_4bit_type("nf4", device="cpu")
    flat = packed.flatten()
    codes = torch.stack([flat >> 4, flat & 15], 1).flatten().long()[:state.shape.numel()]
    scales = state.absmax.repeat_interleave(state.blocksize)[:codes.numel()]
    return (table[codes] * scales).view(state.shape).to(state.dtype)


def loftq_config(iters: int = 1, **changes: Any) -> dt.LoraConfig:
    fields: dict[str, Any] = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS, "init_lora_weights": "loftq",
                              "loftq_config": dt.LoftQConfig(loftq_bits=4, loftq_iter=iters)}
    return dt.LoraConfig(**(fields | changes))


def adapted(model: nn.Module) -> dict[str, DeltaLayer]:
    return {k: m for k, m in model.named_modules() if isinstance(m, DeltaLayer)}


def frobenius(t: Tensor) -> float:
    return float(torch.linalg.matrix_norm(t.detach().double()))


# ------------------------------------------------------------------------------- one matrix vs peft

@pytest.mark.parametrize("iters", [1, 2, 5])
@pytest.mark.parametrize(("shape", "r"), [((48, 80), 4), ((7, 9), 3)])  # 63 values: a short last block
def test_factors_equal_peft_loftq_init(cpu_for_cuda: None, iters: int, shape: tuple[int, int], r: int) -> None:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(iters))
    peft_q, peft_a, peft_b = loftq_init(weight, num_bits=4, reduced_rank=r, num_iter=iters)
    b, a, dequantized = loftq_factors(weight, r, {"loftq_bits": 4, "loftq_iter": iters})
    # The same operations on the same inputs (our NF4 is bitsandbytes' bit for bit, then the same SVD)
    assert torch.equal(dequantized, peft_q)
    assert torch.equal(a, peft_a) and torch.equal(b, peft_b)
    assert a.shape == (r, shape[1]) and b.shape == (shape[0], r)
    loftq_error, plain_error = frobenius(weight - dequantized - b @ a), frobenius(weight - nf4_round_trip(weight))
    assert loftq_error < plain_error


def test_first_step_quantizes_w_itself() -> None:
    """With one iteration Q = NF4(W) exactly (QLoRA's base); only A and B differ from QLoRA's."""
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    _, _, dequantized = loftq_factors(weight, 2, {"loftq_bits": 4, "loftq_iter": 1})
    packed, state = quantize_4bit(weight, "nf4", 64, double_quant=False)
    assert torch.equal(dequantized, dt.quant.dequantize_4bit(packed, state))


# ---------------------------------------------------------------------------- a model vs peft

@pytest.mark.parametrize("iters", [1, 3])
def test_attach_equals_peft_get_peft_model(cpu_for_cuda: None, iters: int) -> None:
    base = tiny_llama()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=iters)))
    model = dt.attach(base, loftq_config(iters))
    layers = adapted(model)
    assert len(layers) == 6
    theirs = dict(reference.named_modules())
    for key, layer in layers.items():
        other = theirs[f"base_model.model.{key}"]
        delta = layer.deltas["default"]
        assert torch.equal(delta.A, other.lora_A["default"].weight), key
        assert torch.equal(delta.B, other.lora_B["default"].weight), key
        assert torch.equal(layer.base_layer.weight, other.base_layer.weight), key
    assert close(outputs(model), outputs(reference))
    assert dt.LoraConfig.from_peft_dict(reference.peft_config["default"].to_dict()).loftq_config == {
        "loftq_bits": 4, "loftq_iter": iters}


def test_init_moves_the_model_closer_to_w_than_plain_qlora() -> None:
    original = tiny_llama()
    model = dt.attach(tiny_llama(), loftq_config(iters=2))
    weights = dict(original.named_modules())
    for key, layer in adapted(model).items():
        w = weights[key].weight.detach()
        delta = layer.deltas["default"]
        start = layer.base_layer.weight.detach() + delta.low_rank_weight()
        assert frobenius(w - start) < frobenius(w - nf4_round_trip(w)), key
        assert torch.equal(nf4_round_trip(layer.base_layer.weight.detach()), layer.base_layer.weight), key


def test_alpha_twice_r_undoes_the_gain() -> None:
    """peft's convention: B A, not s B A, approximates E = W - dequant(Q). At s = 2 and one iteration
    the start is off by ||E - 2 E_r|| = ||E|| (E_r is E's orthogonal projection): QLoRA's error."""
    original = dict(tiny_llama().named_modules())
    model = dt.attach(tiny_llama(), loftq_config(iters=1, lora_alpha=8))  # r = 4
    for key, layer in adapted(model).items():
        w = original[key].weight.detach()
        start = layer.base_layer.weight.detach() + layer.deltas["default"].low_rank_weight()
        assert frobenius(w - start) == pytest.approx(frobenius(w - nf4_round_trip(w)), rel=1e-5), key


def test_save_load_rederives_the_quantized_base(tmp_path: Path) -> None:
    """As for PiSSA, the saved config keeps the init: loading onto W quantizes it again."""
    model = dt.attach(tiny_llama(), loftq_config(iters=2))
    dt.save(model, tmp_path)
    assert close(outputs(dt.load(tiny_llama(), tmp_path)), outputs(model))


# ----------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("loftq", "field", "words"), [
    ({"loftq_bits": 8}, "loftq_config", "loftq_bits=8 is not supported"),
    ({"loftq_bits": 2}, "loftq_config", "loftq_bits=2 is not supported"),
    ({"loftq_iter": 0}, "loftq_config", "loftq_iter=0 must be a positive integer"),
    ({"loftq_bits": 4, "iters": 2}, "loftq_config", "keys LoftQConfig does not know: ['iters']"),
    ({}, "init_lora_weights", "needs loftq_config"),
    (1.5, "loftq_config", "must be a LoftQConfig or a dict of its fields, got float"),
])
def test_bad_settings_are_config_errors(loftq: Any, field: str, words: str) -> None:
    with pytest.raises(dt.ConfigError, match=r"\. Fix: ") as caught:
        dt.LoraConfig(init_lora_weights="loftq", loftq_config=loftq)
    assert caught.value.field == field and words in str(caught.value)


def test_peft_refuses_the_bits_we_refuse_or_has_them(cpu_for_cuda: None) -> None:
    """peft refuses 2 bits too; 8 bits it has (bitsandbytes int8), deltatune does not."""
    with pytest.raises(ValueError, match="nf4 and int8"):
        loftq_init(torch.randn(8, 8), num_bits=2, reduced_rank=2)


def test_dora_and_embeddings_are_refused_and_the_model_is_unchanged() -> None:
    with pytest.raises(dt.ConfigError, match="use_dora=False"):
        loftq_config(use_dora=True)
    model = tiny_llama()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="linear"):
        dt.attach(model, loftq_config(target_modules=["embed_tokens"]))
    assert state_hash(model) == before


def test_loftq_config_without_loftq_init_is_kept_checked_and_warned_about() -> None:
    """Kept as written (a config never silently differs from its file), but said to have no effect."""
    with pytest.warns(UserWarning, match="no effect unless init_lora_weights='loftq'"):
        config = dt.LoraConfig(loftq_config=dt.LoftQConfig(loftq_iter=3))
    assert config.to_peft_dict()["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    for bad in ({"loftq_bits": 8}, 1):
        with pytest.raises(dt.ConfigError) as caught:
            dt.LoraConfig(loftq_config=bad)
        assert caught.value.field == "loftq_config"


def test_on_a_4bit_base_of_another_format_it_is_refused_unchanged() -> None:
    """A 4-bit base is not W: LoftQ has nothing to quantize from, and cannot rewrite it."""
    model = dt.quantize(tiny_llama(), dt.QuantConfig(blocksize=128))
    before = state_hash(model)
    with pytest.raises(dt.QuantError, match="attach to the unquantized model"):
        dt.attach(model, loftq_config())
    assert state_hash(model) == before


# ------------------------------------------------------------------------------ QLoRA + LoftQ

@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_with_loftq(tmp_path: Path, double_quant: bool) -> None:
    """Attach on the dense model, save the adapter, unload (the base keeps dequant(Q)), quantize,
    load: the 4-bit base holds LoftQ's codes and the adapter LoftQ's A and B."""
    original = dict(tiny_llama().named_modules())
    model = dt.attach(tiny_llama(), loftq_config(iters=2))
    expected = outputs(model)
    factors = {k: (m.deltas["default"].A.detach().clone(), m.deltas["default"].B.detach().clone())
               for k, m in adapted(model).items()}
    bases = {k: m.base_layer.weight.detach().clone() for k, m in adapted(model).items()}
    dt.save(model, tmp_path)
    others = ["k_proj", "o_proj", "gate_proj", "up_proj", "lm_head"]  # left dense, so outputs can be compared
    quantized = dt.quantize(dt.unload(model, merge=False),
                            dt.QuantConfig(double_quant=double_quant, skip_modules=tuple(others)))
    dt.load(quantized, tmp_path, trainable=True)
    layers = adapted(quantized)
    assert layers.keys() == factors.keys()
    for key, layer in layers.items():
        four_bit = layer.base_layer
        assert isinstance(four_bit, Linear4bit)
        packed, _ = quantize_4bit(bases[key], "nf4", 64, double_quant=False)
        assert torch.equal(four_bit.weight.view(torch.uint8), packed), key  # the codes of LoftQ's Q
        if not double_quant:
            assert torch.equal(four_bit.dequantize(), bases[key]), key
        delta = layer.deltas["default"]
        assert torch.equal(delta.A, factors[key][0]) and torch.equal(delta.B, factors[key][1]), key
        w = original[key].weight.detach()
        start = four_bit.dequantize() + delta.low_rank_weight()
        assert frobenius(w - start) < frobenius(w - nf4_round_trip(w)), key
    if not double_quant:
        assert close(outputs(quantized), expected)


def test_attach_to_a_4bit_base_starts_as_plain_qlora() -> None:
    """Without W the error to correct is zero: B = 0 as QLoRA's init, and the base is left as it is."""
    model = dt.quantize(tiny_llama())
    before, expected = state_hash(model), outputs(model)
    dt.attach(model, loftq_config())
    for key, layer in adapted(model).items():
        delta = layer.deltas["default"]
        assert not delta.B.any() and delta.A.abs().sum() > 0, key
    assert torch.equal(outputs(model), expected)
    dt.unload(model, merge=False)
    assert state_hash(model) == before


def test_a_short_qlora_loftq_fine_tune_lowers_the_loss(tmp_path: Path) -> None:
    model = dt.attach(tiny_llama(), loftq_config())
    dt.save(model, tmp_path)
    quantized = dt.load(dt.quantize(dt.unload(model, merge=False)), tmp_path, trainable=True)
    losses = lm_losses(quantized, token_ids(batch=4, length=16), steps=10, lr=1e-2)
    assert losses[-1] < losses[0]
