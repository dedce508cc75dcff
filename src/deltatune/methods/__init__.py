"""One file per method; importing this package registers them all."""

from . import lora

__all__ = ["lora"]
