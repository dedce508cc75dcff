"""Functions of the C library, looked up once, where this platform has them."""

from __future__ import annotations

import ctypes
import platform
from functools import cache
from typing import Any


@cache
def libc_function(name: str, argtypes: tuple[Any, ...], restype: Any,
                  glibc_only: bool = False) -> Any | None:
    """The C library's ``name`` with its signature set, or None off Linux, where it is missing,
    or (``glibc_only``) where the C library is not glibc (musl has no ``mallopt``)."""
    if platform.system() != "Linux" or (glibc_only and platform.libc_ver()[0] != "glibc"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = restype
    return function
