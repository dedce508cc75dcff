"""Method options a run sets that its method never reads: a clear error instead of a silent no-op
(an optimizer option of one method passed with another would otherwise train without it and say
nothing).

The registry knows which recipe declared an option, not which recipes read it (an option declared
by one recipe may be read by several), so the run records what its recipe actually reads while
building the adapter, the adapters it builds on and its optimizer groups, and refuses an option set
away from its default that none of those read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import ConfigError
from ..registry import method_options


class ReadRecorder(Mapping[str, Any]):
    """The run's method options, remembering which of them were looked up."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def unread(self, defaults: Mapping[str, Any]) -> list[str]:
        """The options set away from their default that nothing looked up, sorted."""
        return sorted(name for name, value in self._values.items()
                      if name not in self.read and _differs(value, defaults.get(name)))


def refuse_unread(method: str, options: ReadRecorder) -> None:
    """Raise when an option differs from its default and the method never read it."""
    unread = options.unread({o.name: o.default for o in method_options()})
    if unread:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in unread)
        raise ConfigError("RunOptions", unread[0], options._values[unread[0]],
                          f"--method {method} does not use {flags}",
                          "drop the option, or pick a method that uses it (deltatune train --help lists each "
                          "method's options)")


def _differs(value: Any, default: Any) -> bool:
    """Set away from the default (a YAML list and the default tuple of the same names are the same)."""
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return tuple(value) != tuple(default)
    return bool(value != default)
