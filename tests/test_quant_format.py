"""The 4-bit format: bit-exact against bitsandbytes 0.50 (fixtures, and the library itself when
installed), round trips and error bounds (hypothesis), stored bits per parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.quant.blockwise import (
    BLOCKSIZES,
    DEQUANT_CHUNK_BYTES,
    pack_nibbles,
    quantize_4bit,
    dequantize_4bit,
    quantize_8bit,
    dequantize_8bit,
    scales,
    unpack_nibbles,
)
from deltatune.quant.codes import code_4bit, dynamic_map
from deltatune.quant.linear import Linear4bit
from deltatune.quant.memory import empty_output

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "bnb4bit"
needs_fixtures = pytest.mark.skipif(not (FIXTURES / "manifest.json").exists(),
                                    reason=f"bitsandbytes reference fixtures not found at {FIXTURES}")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def manifest_cases() -> list[str]:
    if not (FIXTURES / "manifest.json").exists():
        return ["missing"]
    return sorted(json.loads((FIXTURES / "manifest.json").read_text())["cases"])


@needs_fixtures
@pytest.mark.parametrize("case", manifest_cases())
def test_fixture_case_bit_exact(case: str) -> None:
    from safetensors.torch import load_file

    spec = json.loads((FIXTURES / "manifest.json").read_text())["cases"][case]
    ref = load_file(str(FIXTURES / "nf4_fixture.safetensors"))
    weight = ref[f"{case.split('.')[0]}.input_fp32"].to(DTYPES[spec["dtype"]])
    packed, state = quantize_4bit(weight, "nf4", spec["blocksize"], spec["double_quant"])
    assert list(packed.shape) == spec["packed_shape"] and packed.dtype == torch.uint8
    assert torch.equal(packed, ref[f"{case}.packed"])
    assert state.absmax.dtype == getattr(torch, spec["absmax_dtype"])
    assert torch.equal(state.absmax, ref[f"{case}.absmax"])
    assert torch.equal(state.code, ref["nf4_code"])
    if spec["double_quant"]:
        assert state.nested is not None and state.nested.blocksize == spec["nested_blocksize"]
        assert torch.equal(state.nested.absmax, ref[f"{case}.nested_absmax"])
        assert torch.equal(state.nested.code, ref[f"{case}.nested_code"])
        assert torch.equal(state.nested.offset.view(1), ref[f"{case}.offset"])
    dense = dequantize_4bit(packed, state)
    assert dense.dtype == weight.dtype and torch.equal(dense, ref[f"{case}.dequant"])


def test_code_books() -> None:
    nf4 = code_4bit("nf4")
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1 and torch.all(nf4[1:] > nf4[:-1])
    fp4 = code_4bit("fp4")  # 1 sign bit (bit 3), magnitudes 0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4
    assert torch.equal(fp4[8:], -fp4[:8]) and fp4[3] == 1 and fp4[1] == 0.0625 / 12
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert signed.shape == unsigned.shape == (256,) and signed[-1] == 1 and signed[0] < 0 <= unsigned[0]
    assert torch.all(signed[1:] >= signed[:-1])


# ------------------------------------------------------------------------- against bitsandbytes itself

def _bnb_random_cases() -> list[tuple[tuple[int, ...], torch.dtype, int, str, bool]]:
    g = torch.Generator().manual_seed(2024)
    cases = []
    for i in range(24):
        shape = tuple(int(s) for s in torch.randint(1, 200, (1 + i % 3,), generator=g))
        cases.append((shape, list(DTYPES.values())[i % 3], BLOCKSIZES[i % len(BLOCKSIZES)], ("nf4", "fp4")[i // 3 % 2],
                      i % 2 == 0))
    return cases


@pytest.mark.parametrize(("shape", "dtype", "blocksize", "quant_type", "double_quant"), _bnb_random_cases())
def test_matches_bitsandbytes(shape: tuple[int, ...], dtype: torch.dtype, blocksize: int, quant_type: str,
                              double_quant: bool) -> None:
    import bitsandbytes.functional as bnbf
    g = torch.Generator().manual_seed(sum(shape) + blocksize)
    weight = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3).to(dtype)
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
    ref_packed, ref = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                         quant_type=quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert torch.equal(state.code, ref.code)
    if double_quant:
        assert state.nested is not None
        assert torch.equal(state.nested.absmax, ref.state2.absmax) and torch.equal(state.nested.code, ref.state2.code)
        assert torch.equal(state.nested.offset, ref.offset)
    expected = bnbf.dequantize_4bit(ref_packed, ref)
    assert torch.equal(dequantize_4bit(packed, state), expected.view(shape))  # bnb returns 1-D weights as (1, n)


def test_8bit_matches_bitsandbytes_blockwise() -> None:
    import bitsandbytes.functional as bnbf
    g = torch.Generator().manual_seed(5)
    for n in (1, 255, 256, 1000, 5000):
        values = torch.randn(n, generator=g) ** 3
        codes, absmax = quantize_8bit(values, 256)
        ref_codes, ref = bnbf.quantize_blockwise(values, blocksize=256)
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref.absmax)
        assert torch.equal(dequantize_8bit(codes, absmax, dynamic_map(True), 256), bnbf.dequantize_blockwise(codes, ref))


# ------------------------------------------------------------------------------- properties (hypothesis)

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=301))
def test_pack_unpack_round_trip(codes: list[int]) -> None:
    packed = pack_nibbles(torch.tensor(codes))
    assert packed.shape == ((len(codes) + 1) // 2, 1)
    assert unpack_nibbles(packed, len(codes)).tolist() == codes
    assert (packed[0, 0] >> 4).item() == codes[0]  # the first code sits in the high nibble


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), blocksize=st.sampled_from(BLOCKSIZES),
       quant_type=st.sampled_from(["nf4", "fp4"]), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_error_bound_and_requantization(rows: int, cols: int, blocksize: int, quant_type: str, seed: int,
                                        scale: float) -> None:
    """Without double quant every value is within half the widest code gap of its block's absmax,
    and quantizing the dequantized weight again gives the same values (nearest code is stable)."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant=False)
    dense = dequantize_4bit(packed, state)
    code = code_4bit(quant_type).sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    flat = torch.cat([weight.view(-1), weight.new_zeros(-weight.numel() % blocksize)]).view(-1, blocksize)
    bound = (flat.abs().amax(1, keepdim=True) * half_gap * (1 + 1e-6)).expand_as(flat).reshape(-1)[:weight.numel()]
    assert ((dense - weight).abs().view(-1) <= bound).all()
    again, state2 = quantize_4bit(dense, quant_type, blocksize, double_quant=False)
    assert torch.equal(state2.absmax, state.absmax) and torch.equal(dequantize_4bit(again, state2), dense)
    if quant_type == "nf4":  # FP4 has +0 and -0, so a zero may come back under the other nibble
        assert torch.equal(again, packed)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**16))
def test_double_quant_error_bound(n: int, seed: int) -> None:
    """The nested 8-bit absmax is within one dynamic-code step of the true absmax."""
    weight = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    _, plain = quantize_4bit(weight, "nf4", 64, double_quant=False)
    packed, nested = quantize_4bit(weight, "nf4", 64, double_quant=True)
    from deltatune.quant.blockwise import scales

    decoded = scales(nested)
    assert nested.nested is not None
    step = float((dynamic_map(True)[1:] - dynamic_map(True)[:-1]).max())
    block_scale = nested.nested.absmax.repeat_interleave(256)[: plain.absmax.numel()]
    assert ((decoded - plain.absmax).abs() <= step * block_scale + 1e-7).all()


def test_nf4_gaussian_error_matches_brute_force_oracle() -> None:
    """On N(0, 1) weights NF4's relative RMS error is that of exact nearest-code rounding (fp64
    brute force), about 0.092 at block size 64, and lower than FP4's."""
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    blocks = weight.double().view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    code = code_4bit("nf4").double()
    nearest = code[(blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)] * absmax
    oracle = ((nearest.view_as(weight) - weight).norm() / weight.norm()).item()
    errors = {}
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(weight, quant_type, 64, double_quant=True)
        errors[quant_type] = ((dequantize_4bit(packed, state) - weight).norm() / weight.norm()).item()
    assert errors["nf4"] == pytest.approx(oracle, rel=2e-3)  # double quant adds ~0.03 % here
    assert errors["nf4"] < 0.095 and errors["nf4"] < errors["fp4"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_naive_decoding_across_chunks(dtype: torch.dtype) -> None:
    """The chunked decoder (several chunks, a short last block, an odd count, a >4 MiB fp32 output
    that gets huge-page advice) equals code[nibble] * absmax computed the plain way."""
    weight = torch.randn(1025, 1031, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, state = quantize_4bit(weight, "nf4", 64, double_quant=True)
    n = weight.numel()
    nibbles = unpack_nibbles(packed.view(-1), n).long()
    absmax = scales(state).repeat_interleave(64)[:n]
    naive = (state.code[nibbles] * absmax).to(dtype).view(weight.shape)
    assert 2 * packed.numel() > 2 * DEQUANT_CHUNK_BYTES  # more than one chunk
    assert torch.equal(dequantize_4bit(packed, state), naive)


def test_empty_output_is_a_plain_writable_buffer() -> None:
    for numel in (10, 3 << 20):  # below and above the huge-page threshold
        buffer = empty_output(numel, torch.float32, torch.device("cpu"))
        assert buffer.shape == (numel,) and buffer.dtype == torch.float32
        buffer.fill_(2.0)
        assert float(buffer.sum()) == 2.0 * numel


def test_stored_bits_per_parameter_with_double_quant() -> None:
    """Packed codes, uint8 absmax per 64, fp32 nested absmax per 256 blocks, both code books and the
    offset, all counted from the layer's actual buffers: at most 4.13 bits per weight."""
    layer = Linear4bit.from_weight(torch.randn(2048, 4096), double_quant=True)
    bits = layer.stored_bits() / (2048 * 4096)
    assert bits <= 4.13, bits
    plain = Linear4bit.from_weight(torch.randn(256, 256), double_quant=False)
    assert plain.stored_bits() / 256**2 > 4.5  # fp32 absmax per 64 weights costs 0.5 bit: the reason for double quant


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_quant_storage_views_the_same_bytes(storage: torch.dtype) -> None:
    weight = torch.randn(32, 16)
    packed, state = quantize_4bit(weight, "nf4", 64, True)
    other, other_state = quantize_4bit(weight, "nf4", 64, True, quant_storage=storage)
    assert other.dtype == storage and torch.equal(other.view(-1).view(torch.uint8), packed.view(-1))
    assert torch.equal(dequantize_4bit(other, other_state), dequantize_4bit(packed, state))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quant_type": "int4"}, "quant_type='int4'"),
    ({"blocksize": 48}, "blocksize=48"),
    ({"quant_storage": torch.int32}, "quant_storage"),
])
def test_invalid_arguments_name_the_argument(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_4bit(torch.randn(8, 8), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float64"):
        quantize_4bit(torch.randn(8, 8, dtype=torch.float64))
