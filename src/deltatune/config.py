"""Base configs: frozen, validated dataclasses that read and write peft's adapter_config.json.

A config is checked once, when it is built, and never changes afterwards: every field that a
caller could pass as a list is stored as a tuple, every mapping as a read-only mapping. Field
names are peft's, so that adapter_config.json round-trips and peft users feel at home.

Reading a peft file is lenient in one way only: keys this version does not know are ignored
with a single warning that lists them. Keys peft knows but deltatune does not implement are
accepted while they hold their "off" value, and rejected with a clear error otherwise, because
ignoring them would silently give different outputs.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from .compose import Composition
from .errors import AdapterFileError, ConfigError
from .values import is_int, is_positive_int

FILE_PREFIX = "base_model.model."
"""What peft-style file keys of layer tensors and saved modules start with (peft's wrapper path)."""

TASK_TYPES = (
    "CAUSAL_LM",
    "SEQ_CLS",
    "TOKEN_CLS",
    "SEQ_2_SEQ_LM",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
"""peft's task types; a task type may add task heads to ``modules_to_save``."""

TASK_HEADS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
)
"""Heads that peft trains and saves for a task type (the names transformers gives them)."""
HEAD_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({"SEQ_CLS": ("classification_head",)})
"""Task heads under names peft does not know (T5's and BART's sequence classifiers): trained and
saved, named in ``modules_to_save``, when the model has none of ``TASK_HEADS``' names."""

C = TypeVar("C", bound="DeltaConfig")


class FrozenDict(dict[str, Any]):
    """A read-only dict: JSON-serialisable, picklable and deep-copyable, unlike MappingProxyType."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config mappings are read-only; build a new config with config.replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]
    __ior__ = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _freeze(value: Any) -> Any:
    """Lists become tuples and dicts read-only mappings, recursively, so a config cannot change."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    return value


def _thaw(value: Any) -> Any:
    """The JSON form of a frozen value: tuples become lists, mappings dicts."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def saved_with_heads(modules_to_save: tuple[str, ...] | None, task_type: str | None) -> tuple[str, ...]:
    """``modules_to_save`` plus the heads the task type trains, as peft does (for configs that have them)."""
    names = list(modules_to_save or ())
    return tuple(names + [h for h in TASK_HEADS.get(task_type or "", ()) if h not in names])


def check_modules_to_save(config: DeltaConfig, value: Any) -> None:
    """``modules_to_save`` is None or a list of non-empty module names."""
    config.check(value is None or (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)),
                 "modules_to_save", "it must be a list of module names", "pass e.g. ['classifier'] or None")


def _is_off(value: Any) -> bool:
    """Whether a peft field that deltatune does not implement holds an 'off' value."""
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaConfig:
    """Fields every method shares. Subclasses set ``peft_type`` and add their own fields."""

    peft_type: ClassVar[str] = ""
    peft_ignored: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """peft keys with no effect in deltatune: any value is accepted; written with this default."""
    peft_unsupported: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """peft features deltatune lacks: accepted only while 'off'; written with this default."""
    file_prefix: ClassVar[str] = FILE_PREFIX
    """What file keys of layer tensors and saved modules start with (peft's wrapper path for the method)."""
    condense_targets: ClassVar[bool] = True
    """Whether long target lists are shortened to suffixes as peft does (peft skips it for methods whose two target lists are coupled)."""
    ties_saved_copies: ClassVar[bool] = False
    """Whether saved copies (``modules_to_save``) that share a tensor in the base share one trainable tensor
    (a tied output head and embedding train as one); peft's default (``ensure_weight_tying=False``) unties them."""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _freeze(getattr(self, field.name)))
        self.check(self.task_type is None or self.task_type in TASK_TYPES, "task_type",
                   f"task_type must be one of {TASK_TYPES} or None", "pass one of those names, e.g. 'CAUSAL_LM'")
        self.check(isinstance(self.inference_mode, bool), "inference_mode", "inference_mode must be a bool",
                   "pass True or False")
        self.validate()

    def validate(self) -> None:
        """Subclasses check their own fields here, with ``self.check``."""

    def loads_trainable(self) -> bool:
        """Whether a saved adapter of this config can be loaded to train on: not when its file holds
        what a trained module computed rather than the module (an encoder's output)."""
        return True

    def trains_with_checkpointing(self) -> bool:
        """Whether the adapter can train while the model recomputes its layers in backward (gradient
        checkpointing); not one that hands every layer state of its own for the call."""
        return True

    def saved_module_names(self) -> tuple[str, ...]:
        """Modules copied, trained in full and saved with the adapter (``modules_to_save`` and the task's
        heads, for configs that have them)."""
        return ()

    def active_form(self, name: str) -> str | Composition:
        """What activating adapter ``name`` means: the adapter itself for most methods; a method whose
        adapter runs over others' outputs (AdapterFusion: ``Fuse`` of its members) says so."""
        return name

    def located(self: C, folder: Path) -> C:
        """This config as read from the adapter folder ``folder``. A config that names other adapter
        folders relative to its own (``saved_folders``, so that a saved folder moves whole) has them
        made usable from any working directory here; by default there is nothing to do."""
        return self

    def saved_folders(self) -> Mapping[str, Path]:
        """Adapter folders a save copies into this adapter's folder: subfolder (a relative path, the one
        ``to_peft_dict`` names it by) -> the adapter folder copied there. By default none."""
        return {}

    def check(self, ok: bool, field: str, why: str, fix: str) -> None:
        """Raise a ConfigError naming ``field``, its value, the reason and the fix unless ``ok``."""
        if not ok:
            raise ConfigError(type(self).__name__, field, getattr(self, field), why, fix)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, with every key peft 0.21 writes for this method."""
        out: dict[str, Any] = {**dict(self.peft_ignored), **dict(self.peft_unsupported)}
        out.update({f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)})
        out["peft_type"] = self.peft_type
        return dict(sorted(out.items()))

    @classmethod
    def from_peft_dict(cls: type[C], data: Mapping[str, Any], source: str = "adapter_config.json") -> C:
        """Build a config from adapter_config.json content, as peft would read it."""
        peft_type = data.get("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise AdapterFileError(f"{source}: peft_type is {peft_type!r}, expected {cls.peft_type!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, value in data.items():
            if key in cls.peft_unsupported and not _is_off(value) and value != cls.peft_unsupported[key]:
                raise AdapterFileError(
                    f"{source}: {key}={value!r} is a peft feature deltatune does not implement yet, so this "
                    f"adapter cannot be reproduced exactly. Fix: use an adapter saved without {key}."
                )
        known = names | set(cls.peft_ignored) | set(cls.peft_unsupported) | {"peft_type", "auto_mapping", "peft_version"}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring keys unknown to deltatune {cls.__name__}: {unknown}", stacklevel=2)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetedConfig(DeltaConfig):
    """A config that selects modules of the model by name, with peft's matching rules.

    ``target_modules``: a list matches a module whose full name equals an entry or ends with
    ``"." + entry``; a string is a regular expression that must match the full name;
    ``"all-linear"`` selects every linear layer except the output head; None uses the model
    type's defaults (``default_tables``: the usual attention projections unless a method says
    otherwise). ``exclude_modules`` uses the same rules to drop
    modules. ``layers_to_transform`` keeps only the given layer indices (the number after
    ``layers_pattern`` in the name, or the first number in it). ``modules_to_save`` names
    modules that are copied, trained in full and saved with the adapter.
    """

    default_tables: ClassVar[Mapping[str, str]] = MappingProxyType({"target_modules": "attention"})
    """Fields that, left None, take the model architecture's defaults when attached: field name ->
    the name of a table in ``hf.ARCHITECTURE_TABLES`` (peft fills them from its own tables likewise)."""

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # peft stores these name lists as sets: keep them sorted and unique, so equal selections compare equal.
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
                object.__setattr__(self, field, tuple(sorted(set(value))))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for field in ("target_modules", "exclude_modules"):
            self._check_names(field)
        self._check_names("layers_pattern")
        check_modules_to_save(self, self.modules_to_save)
        layers = self.layers_to_transform
        ok = layers is None or (is_int(layers) and layers >= 0) or (
            isinstance(layers, tuple) and all(is_int(i) and i >= 0 for i in layers))
        self.check(ok, "layers_to_transform", "it must be a layer index or a list of non-negative layer indices",
                   "pass e.g. [0, 1, 2] or None")
        self.check(layers is None or isinstance(self.target_modules, tuple) or self.target_modules is None,
                   "layers_to_transform", "peft applies layers_to_transform only when target_modules is a list",
                   "give target_modules as a list of names, or encode the layers in the regular expression")
        self.check(not self.layers_pattern or layers is not None, "layers_pattern",
                   "layers_pattern only says where layer numbers are, for layers_to_transform, which is not set",
                   "also pass layers_to_transform, or drop layers_pattern")

    def _check_names(self, field: str) -> None:
        value = getattr(self, field)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                self.check(False, field, f"it is not a valid regular expression ({err})",
                           "escape special characters or pass a list of module names")
            return
        self.check(value is None or (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)),
                   field, "it must be a list of non-empty module names, a regular expression string or None",
                   "pass e.g. ['q_proj', 'v_proj']")

    def trained_biases(self) -> str:
        """Which base biases the adapter trains and saves: "none", "all", or "adapted" (those of
        the layers it adapts). Methods with a bias option override this."""
        return "none"

    def parameter_targets(self) -> tuple[str, ...]:
        """Parameters the adapter changes directly, by name (peft's ``target_parameters``: experts'
        3-D weights); a method that supports them overrides this."""
        return ()

    def saved_module_names(self) -> tuple[str, ...]:
        """``modules_to_save`` plus the heads the task type trains, as peft does."""
        return saved_with_heads(self.modules_to_save, self.task_type)

    def resolved(self: C, changes: Mapping[str, Any], names: Sequence[str]) -> C:
        """This config with the values attach settles (``changes``: fields left None filled from the
        architecture's tables, "all-linear" expanded to full names); ``names`` are the model's module
        names, for a method whose other fields must follow the resolved targets. One replace, so the
        fields are checked together once."""
        return self.replace(**changes)
