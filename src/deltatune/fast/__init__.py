"""Opt-in fused kernels for a frozen base: ``accelerate(model)`` and ``restore(model)``."""

from .accelerate import accelerate, restore

__all__ = ["accelerate", "restore"]
