"""One file per method; importing this package registers them all."""

from . import adalora, bitfit, ia3, lora, vera

__all__ = ["adalora", "bitfit", "ia3", "lora", "vera"]
