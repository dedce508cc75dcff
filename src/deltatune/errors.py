"""The exceptions deltatune raises.

Every message says what went wrong, where, and how to fix it. They subclass the builtin
exception a caller would naturally catch (ValueError, KeyError, ...) so generic code keeps
working.
"""

from __future__ import annotations


class DeltatuneError(Exception):
    """Base class of all deltatune errors."""


class ConfigError(DeltatuneError, ValueError):
    """A config field holds an invalid value."""

    def __init__(self, config: str, field: str, value: object, why: str, fix: str) -> None:
        self.config, self.field, self.value = config, field, value
        super().__init__(f"{config}.{field}={value!r} is invalid: {why}. Fix: {fix}.")


class TargetError(DeltatuneError, ValueError):
    """A config selects no module, or a module that cannot be adapted."""


class AdapterError(DeltatuneError, KeyError):
    """An adapter name is unknown, taken, or used where it cannot be."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class AdapterFileError(DeltatuneError, ValueError):
    """An adapter folder is missing, corrupt, unsafe (pickle) or does not fit the model."""


class DataError(DeltatuneError, ValueError):
    """A data file or row cannot be used: missing file or column, bad line, unknown label."""


class TrainingError(DeltatuneError, RuntimeError):
    """Training cannot go on: the loss became NaN/inf, or a checkpoint does not fit the run."""


class QuantError(DeltatuneError, ValueError):
    """An operation needs a dense weight but the layer stores it quantized (or the format does not fit)."""


class ModelLoadError(DeltatuneError, OSError):
    """A base model cannot be loaded: no such folder or file, not on this machine (offline), or a package
    its format needs is missing."""
