"""One file per method; importing this package registers them all."""

from . import ia3
from . import lora

__all__ = ["ia3", "lora"]
