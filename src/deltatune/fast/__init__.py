"""Opt-in speed-ups: fused kernels for a frozen base (``accelerate(model)``, ``restore(model)``)
and glibc's allocator told to keep freed memory (``retain_freed_memory()``)."""

from .accelerate import accelerate, restore
from .allocator import retain_freed_memory

__all__ = ["accelerate", "restore", "retain_freed_memory"]
