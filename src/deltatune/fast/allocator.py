"""Keep the memory that freed tensors release inside the process, instead of unmapping it.

Why: glibc serves every allocation above its mmap threshold (128 KiB at start, growing up to
32 MiB as it sees large frees) with a fresh ``mmap`` and unmaps it again on ``free``. A
training step allocates and frees hundreds of MB of activations, so every step writes to fresh
pages, and the kernel zero-fills each 4 KiB page on its first touch: about 130 000 minor page
faults per step on the benchmark LLaMA (bench/child.py records them). With mmap off and the
heap never trimmed, freed blocks stay mapped and the next step reuses them.

The price is memory: the heap keeps its largest extent and its holes, so peak RSS grows (by
20-25% on the benchmark LLaMA, 5% with ``dt.accelerate``, which allocates less; docs/speed.md). The setting is process-wide (every library in the process
allocates through the same heap), affects only allocations made after it, and exists only on
glibc (Linux); elsewhere it does nothing and says so. Equivalent environment settings for a
program started fresh: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes

from ..libc import libc_function

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's documented static defaults. Once any of these is set, its dynamic mmap threshold is off
# for the rest of the process, so "restore" means these values.
DEFAULT_MMAP_MAX = 65536
DEFAULT_THRESHOLD = 128 * 1024
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def retain_freed_memory(enable: bool = True) -> bool:
    """Make this process keep freed memory mapped for reuse (``enable=False``: glibc's static
    defaults again). Returns whether the setting took effect: False where the C library is not
    glibc. Measure before keeping it: it trades peak RSS for fewer page faults."""
    mallopt = libc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int, glibc_only=True)
    if mallopt is None:
        return False
    settings: tuple[tuple[int, int], ...]
    if enable:
        settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
    else:
        settings = ((M_MMAP_MAX, DEFAULT_MMAP_MAX), (M_TRIM_THRESHOLD, DEFAULT_THRESHOLD),
                    (M_MMAP_THRESHOLD, DEFAULT_THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)

