"""Blockwise 4-bit quantization (NF4 / FP4) with optional double quantization, bit-identical to bitsandbytes 0.50.

Format (bitsandbytes' ``quantize_4bit`` / ``QuantState``): the weight is flattened row-major and
cut into blocks of ``blocksize`` values (the last block may be short). Each block keeps its
absmax in fp32 and each value the nibble of the code-book entry nearest to ``value / absmax``;
byte ``i`` of the packed tensor ``(ceil(n / 2), 1)`` holds value ``2i`` in the high nibble and
``2i + 1`` in the low one. Double quantization (QLoRA's "double quant") stores the absmax values
themselves in 8 bits: ``offset = mean(absmax)`` and ``absmax - offset`` is quantized with the
signed dynamic 8-bit code in blocks of 256 (see ``quantize_8bit``).

Every rounding step copies bitsandbytes' CPU path operation by operation, because a different
but equally valid order (``x / a`` instead of ``x * (1 / a)``) flips a few codes per million:
full blocks are scaled by the reciprocal of their absmax, the short last block is divided.
Everything is vectorized over blocks; nothing loops in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .codes import QUANT_TYPES, code_4bit, dynamic_map, rounding_4bit
from .memory import empty_output

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The block sizes bitsandbytes accepts for 4-bit quantization."""
NESTED_BLOCKSIZE = 256
"""bitsandbytes quantizes the absmax values in blocks of 256 (fixed in ``quantize_4bit``)."""
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
"""The packed bytes can be viewed as another dtype (FSDP needs the same dtype everywhere)."""


@dataclass(frozen=True)
class NestedState:
    """The double quantization of a 4-bit state's absmax: ``absmax = code[q] * nested_absmax[block] + offset``."""

    absmax: Tensor
    """fp32 ``(ceil(blocks / 256),)``: the absmax of each block of 256 centred absmax values."""
    code: Tensor
    """The signed dynamic 8-bit map, 256 fp32 values."""
    offset: Tensor
    """fp32 scalar: the mean of the absmax values, subtracted before quantizing them."""
    blocksize: int = NESTED_BLOCKSIZE


@dataclass(frozen=True)
class QuantState:
    """Everything needed to turn packed 4-bit codes back into the dense weight."""

    absmax: Tensor
    """One scale per block: fp32, or uint8 codes of the nested state under double quantization."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    """The dtype of the weight that was quantized; ``dequantize_4bit`` returns this dtype."""
    blocksize: int
    quant_type: str
    code: Tensor
    """The 16 code-book values, indexed by nibble."""
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def check_arguments(weight: Tensor, quant_type: str, blocksize: int, quant_storage: torch.dtype) -> None:
    """Raise a ValueError naming the argument, its value and the allowed values."""
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 weights, got {weight.dtype}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; use one of {QUANT_TYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; use one of {BLOCKSIZES}")
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage={quant_storage} is not supported; use one of {STORAGE_DTYPES}")
    size = torch.empty((), dtype=quant_storage).element_size()
    if -(-weight.numel() // 2) % size:
        raise ValueError(f"a weight of {weight.numel()} values packs into {-(-weight.numel() // 2)} bytes, which "
                         f"is not a whole number of {quant_storage} elements; use quant_storage=torch.uint8")


def block_scales(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """The fp32 absmax of each block and every value scaled into [-1, 1] by its block's absmax.

    Full blocks are multiplied by ``1 / absmax`` and the short last block divided by its absmax,
    each clamped away from zero, exactly as bitsandbytes does (see the module docstring).
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).view(-1)
    if full == n:
        return absmax, scaled
    rest = flat[full:]
    last = rest.abs().max().clamp(min=1e-38)
    return torch.cat([absmax, last.view(1)]), torch.cat([scaled, torch.clamp(rest / last, -1, 1)])


def pack_nibbles(codes: Tensor, pad: int = 0) -> Tensor:
    """Two codes per byte, the first in the high nibble; an odd count is padded with code ``pad``."""
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """The inverse of ``pack_nibbles``: ``n`` codes as int64 (ready for indexing)."""
    flat = packed.reshape(-1).view(torch.uint8)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n].long()


def quantize_4bit(weight: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  quant_storage: torch.dtype = torch.uint8) -> tuple[Tensor, QuantState]:
    """Quantize ``weight`` to packed 4-bit codes and their state, bit for bit as bitsandbytes 0.50's
    ``quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type, quant_storage)``."""
    check_arguments(weight, quant_type, blocksize, quant_storage)
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = block_scales(flat, blocksize)
    midpoints, order = rounding_4bit(quant_type, weight.device)
    index = torch.bucketize(scaled, midpoints, out_int32=True)  # a value on a midpoint takes the lower code
    codes = index if quant_type == "nf4" else order[index]
    # bitsandbytes pads an odd count with the scaled value 0.0 before rounding, so the spare
    # nibble holds the code of zero (7 for NF4), not 0; it is never read back.
    zero = torch.bucketize(torch.zeros(1, device=weight.device), midpoints)
    packed = pack_nibbles(codes, int((zero if quant_type == "nf4" else order[zero]).item()))
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).unsqueeze(1)
    code = code_4bit(quant_type, weight.device).clone()
    nested = None
    if double_quant:
        offset = absmax.mean()
        absmax, nested_absmax = quantize_8bit(absmax - offset, NESTED_BLOCKSIZE)
        nested = NestedState(nested_absmax, dynamic_map(True, weight.device).clone(), offset)
    return packed, QuantState(absmax, tuple(weight.shape), weight.dtype, blocksize, quant_type, code, nested)


def scales(state: QuantState) -> Tensor:
    """The fp32 absmax of every block, decoding the nested 8-bit state under double quantization."""
    if state.nested is None:
        return state.absmax.float()
    nested = state.nested
    return dequantize_8bit(state.absmax, nested.absmax, nested.code, nested.blocksize) + nested.offset


DEQUANT_CHUNK_BYTES = 1 << 18
"""Packed bytes decoded per chunk: the int32 indices (1 MiB) and fp32 values (2 MiB) of a chunk stay
in cache and are reused, so a call touches fresh memory only for its output (page faults on fresh
intermediates cost more than the arithmetic)."""


def dequantize_4bit(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """The dense weight: ``code[nibble] * absmax[block]`` in fp32, cast to ``state.dtype`` (or ``dtype``).

    Each packed byte is looked up once in a 256-entry table of its two code values (one gather of
    8-byte pairs instead of two nibble unpacks and a gather per value), then scaled by its block's
    absmax. The product is rounded to fp32 and then to the output dtype, as in bitsandbytes. The
    work goes chunk by chunk through small reused buffers (see ``DEQUANT_CHUNK_BYTES``).
    """
    n, blocksize = state.numel, state.blocksize
    absmax = scales(state)
    table = pair_table(state.code)
    source = packed.reshape(-1).view(torch.uint8)
    dtype = dtype or state.dtype
    out = empty_output(2 * source.numel(), dtype, source.device)
    # a chunk holds whole blocks (blocksize / 2 bytes each), so its absmax are a contiguous slice;
    # on a GPU one chunk does it all (the CPU cache argument does not apply, kernel launches do)
    step = max(DEQUANT_CHUNK_BYTES // (blocksize // 2), 1) * (blocksize // 2)
    step = step if source.device.type == "cpu" else max(source.numel(), 1)
    indices = torch.empty(min(step, source.numel()), dtype=torch.int32, device=source.device)
    # values are gathered and scaled in a cached fp32 buffer and streamed to the output once:
    # gathering straight into the fresh output measured slower, even for fp32 (58 vs 50 ms at 4096^2)
    scratch = torch.empty(2 * indices.numel(), device=source.device)
    for start in range(0, source.numel(), step):
        stop = min(start + step, source.numel())
        index = indices[:stop - start]
        index.copy_(source[start:stop])
        values = scratch[:2 * (stop - start)]
        torch.index_select(table, 0, index, out=values.view(torch.int64))
        scale_blocks(values, absmax, 2 * start // blocksize, blocksize, out[2 * start:2 * stop])
    return out[:n].view(state.shape)


def scale_blocks(values: Tensor, absmax: Tensor, first: int, blocksize: int, out: Tensor) -> None:
    """``out = values * absmax`` of their blocks (``first`` being the first block), rounded to
    ``out``'s dtype; an fp32 ``out`` is written straight from the product (one pass fewer)."""
    full = values.numel() // blocksize
    whole = values[:full * blocksize].view(full, blocksize)
    block_absmax = absmax[first:first + full].unsqueeze(1)
    if out.dtype == values.dtype:
        torch.mul(whole, block_absmax, out=out[:full * blocksize].view(full, blocksize))
    else:  # scale in the fp32 buffer, then one rounding copy
        whole.mul_(block_absmax)
        out[:full * blocksize].copy_(values[:full * blocksize])
    if full * blocksize < values.numel():  # the short last block (its padding value is discarded)
        torch.mul(values[full * blocksize:], absmax[first + full], out=values[full * blocksize:])
        out[full * blocksize:].copy_(values[full * blocksize:])


def pair_table(code: Tensor) -> Tensor:
    """For every byte value, its two code values (high nibble first) as one 8-byte entry."""
    pairs = torch.stack([code.float().repeat_interleave(16), code.float().repeat(16)], dim=1).contiguous()
    return pairs.view(torch.int64).view(-1)


def quantize_8bit(values: Tensor, blocksize: int, code: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization of fp32 ``values`` with a sorted 256-value code (default: signed dynamic).

    Returns the uint8 codes and the fp32 absmax per block. This reproduces bitsandbytes' native CPU
    kernel, which rounds through a 65536-entry table: a scaled value ``v`` in [-1, 1] becomes the
    grid point ``round((v + 1) / 2 * 65535) / 65535 * 2 - 1``, and that point goes to its nearest
    code. Plain nearest rounding of ``v`` differs in a few codes, so the grid step is kept.
    """
    code = dynamic_map(True, values.device) if code is None else code
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.cat([flat, flat.new_zeros(blocks * blocksize - n)]).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # zero padding cannot raise a block's absmax
    scaled = torch.clamp(padded * (1.0 / absmax).unsqueeze(1), -1, 1)
    grid = (((scaled + 1) * 0.5) * 65535 + 0.5).to(torch.int32)
    point = grid.float() / 65535 * 2 - 1
    midpoints = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(point, midpoints, out_int32=True).to(torch.uint8)
    return codes.view(-1)[:n].view(values.shape), absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """``code[q] * absmax[block]`` in fp32 (bitsandbytes' ``dequantize_blockwise``)."""
    n = codes.numel()
    values = code[codes.reshape(-1).long()]
    blocks = absmax.numel()
    if n % blocksize:
        values = torch.cat([values, values.new_zeros(blocks * blocksize - n)])
    return (values.view(blocks, blocksize) * absmax.unsqueeze(1)).view(-1)[:n].view(codes.shape)
