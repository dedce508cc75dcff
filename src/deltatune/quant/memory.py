"""Fresh CPU output buffers backed by transparent huge pages where the system allows it.

A dequantized 4096x4096 weight is a fresh 64 MiB tensor. glibc serves allocations that large
with a new ``mmap``, and the first write to each of its 16,384 4-KiB pages takes a page fault:
on the reference machine that costs more than decoding the 4-bit codes (16 ms of a 23 ms
dequantize; bitsandbytes' CPU kernel pays the same). Asking the kernel to back the buffer with
2-MiB pages (``madvise(MADV_HUGEPAGE)``, honoured when transparent huge pages are set to
``madvise`` or ``always``) before it is touched cuts the faults 512-fold. This is what PyTorch's
own ``THP_MEM_ALLOC_ENABLE=1`` does for every allocation, applied only to the buffers deltatune
fills itself. Elsewhere (not Linux, not CPU, small buffers, THP off) it is a plain ``torch.empty``.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ..libc import libc_function

HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14  # linux/mman.h
MIN_BYTES = 2 * HUGE_PAGE
"""Below this a buffer spans at most one whole huge page, or comes from glibc's heap (already
faulted in), so advice would gain nothing."""
MADVISE_SIGNATURE = ((ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)


def empty_output(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(numel)`` for a buffer about to be written in full; on CPU under Linux its
    2-MiB-aligned interior is advised to use huge pages (a failed advice changes nothing)."""
    buffer = torch.empty(numel, dtype=dtype, device=device)
    nbytes = numel * buffer.element_size()
    wanted = device.type == "cpu" and nbytes >= MIN_BYTES
    madvise = libc_function("madvise", *MADVISE_SIGNATURE) if wanted else None
    if madvise is not None:
        start = -(-buffer.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        stop = (buffer.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if stop > start:
            madvise(start, stop - start, MADV_HUGEPAGE)
    return buffer
