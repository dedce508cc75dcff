"""dt.retain_freed_memory: glibc keeps freed tensors' memory mapped, so reuse takes no page faults."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

PAGES_PER_TENSOR = 16 * 2**20 * 4 // 4096  # a 64 MiB fp32 tensor in 4 KiB pages
CYCLES = 4
# Counted in a fresh interpreter: the setting is process-wide and pytest's heap is not ours to grow.
SCRIPT = f"""
import resource, torch
import deltatune as dt

def faults_of_cycles():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({CYCLES}):
        tensor = torch.empty(16 * 2**20)
        tensor.fill_(1.0)
        del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_cycles()
stock = faults_of_cycles()
applied = dt.retain_freed_memory()
faults_of_cycles()  # grows the heap once
retained = faults_of_cycles()
restored = dt.retain_freed_memory(False)
print(applied, restored, stock, retained)
"""


def thp_always() -> bool:
    """With transparent huge pages on for every mapping, mmap'd tensors fault 512x less."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[always]" in path.read_text()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_freed_tensors_are_reused_without_page_faults() -> None:
    if thp_always():
        pytest.skip("transparent huge pages are 'always' here: stock frees fault too little to compare")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    applied, restored, stock, retained = out.stdout.split()
    assert applied == "True" and restored == "True"
    # Stock glibc mmaps each 64 MiB tensor afresh: every page faults on every cycle.
    assert int(stock) >= CYCLES * PAGES_PER_TENSOR * 0.9, out.stdout
    assert int(retained) < PAGES_PER_TENSOR // 10, out.stdout
