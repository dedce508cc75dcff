"""Mixed batches: a different adapter for each row of one batch, on one base model.

``with dt.routing(model, ["a", "b", None, "a"]): model(...)`` makes the active composition a
``Route`` for the block: the base runs once for the whole batch and each adapter's work runs on its
own rows (see ``DeltaLayer._routed_change``, the sites of activation and prompt adapters, and
``SavedModule`` for per-adapter task heads). peft's keyword works too:
``model(ids, adapter_names=[...])`` and ``model.generate(ids, adapter_names=[...])`` route that
call (``"__base__"`` is accepted for the base, as in peft). Routing also trains: every row's loss
reaches only its own adapter's tensors. Methods whose forward takes per-call inputs in peft (a task
id per row) register their keyword here (``register_call_keyword``); the same hooks take it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from typing import Any

from torch import Tensor, nn

from .compose import Composition, Route, without
from .errors import AdapterError
from .state import set_active, state_of

KEYWORD = "adapter_names"
"""peft's forward and ``generate`` keyword for per-row adapters."""

CallSetting = Callable[[nn.Module, Any], AbstractContextManager[Any]]
"""``(model, the keyword's value) -> the context one call runs in`` (e.g. the task of each row)."""
_CALL_KEYWORDS: dict[str, CallSetting] = {}


def register_call_keyword(name: str, setting: CallSetting) -> None:
    """Let models with adapters take ``name=`` in forward and ``generate``, as peft's wrappers take
    per-call inputs of some methods: the keyword is removed from the call, which runs inside
    ``setting(model, value)``. A method file registers its keyword; this module names none."""
    if name in _CALL_KEYWORDS or name == KEYWORD:
        raise AdapterError(f"the call keyword {name!r} is already registered")
    _CALL_KEYWORDS[name] = setting


def _enter_settings(model: nn.Module, kwargs: dict[str, Any], stack: ExitStack) -> None:
    """Take the registered keywords out of a call's ``kwargs`` and enter their contexts."""
    for name in [k for k in _CALL_KEYWORDS if k in kwargs]:
        value = kwargs.pop(name)
        if value is not None:
            stack.enter_context(_CALL_KEYWORDS[name](model, value))


@contextmanager
def routing(model: nn.Module, rows: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch uses adapter ``rows[i]`` (None: the base model).

    A batch ``k`` times as long as ``rows`` repeats each entry ``k`` times in place, as ``generate``
    does for beams. Checked in full before anything changes; the previous active composition comes
    back on exit.
    """
    state = state_of(model)
    before = state.active_set.composition
    set_active(model, Route(rows))
    try:
        yield model
    finally:
        set_active(model, _still_loaded(before, state.configs))


def _still_loaded(composition: Composition, loaded: dict[str, Any]) -> Composition:
    """``composition`` less the adapters deleted meanwhile (inside the block)."""
    for name in composition.names():
        if name not in loaded:
            composition = without(composition, name)
    return composition


_ROUTES: weakref.WeakKeyDictionary[nn.Module, list[ExitStack]] = weakref.WeakKeyDictionary()
"""The contexts opened by keyword calls in flight (a route, registered call keywords), innermost last."""


def accept_keyword(model: nn.Module) -> None:
    """Let ``model`` take ``adapter_names=`` (and the registered call keywords) in its forward and
    ``generate`` (done when the first adapter is attached; a model keeps taking them until
    ``release_keyword``). The hooks are found by identity, so a deep copy of the model keeps working
    and releases its own."""
    if _enter not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_enter, with_kwargs=True)
        model.register_forward_hook(_leave, always_call=True)
    if callable(getattr(model, "generate", None)):
        model.__dict__["generate"] = partial(_generate, model)


def release_keyword(model: nn.Module) -> None:
    """Undo ``accept_keyword`` (when the adapters are unloaded)."""
    for hooks, extras, ours in ((model._forward_pre_hooks, (model._forward_pre_hooks_with_kwargs,), _enter),
                                (model._forward_hooks, (model._forward_hooks_always_called,), _leave)):
        for key in [k for k, hook in hooks.items() if hook is ours]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)
    model.__dict__.pop("generate", None)


def _enter(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    stack = ExitStack()
    _ROUTES.setdefault(model, []).append(stack)  # first: ``_leave`` runs even when this hook raises, and closes it
    rows = kwargs.pop(KEYWORD, None)
    if rows is not None:
        _check_batch(rows, args, kwargs, "forward")
        hooks = list(model._forward_pre_hooks)
        stack.enter_context(routing(model, rows))
        if list(model._forward_pre_hooks) != hooks:
            # this call already took its list of pre-hooks: ones the route adds or removes would be missed
            stack.close()
            raise AdapterError(f"forward: {KEYWORD}= routes adapters that put their own hooks on the model's inputs "
                               "(prompt or prefix adapters); route them with `with dt.routing(model, rows): model(...)` "
                               f"or model.generate(..., {KEYWORD}=rows) instead")
    _enter_settings(model, kwargs, stack)
    return args, kwargs


def _leave(model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    stacks = _ROUTES.get(model)
    if stacks:
        stacks.pop().close()


def _generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model class's own ``generate``, inside a routing context when ``adapter_names=`` is given
    and inside the contexts of the registered call keywords given."""
    generate = getattr(type(model), "generate")
    rows = kwargs.pop(KEYWORD, None)
    with ExitStack() as stack:
        if rows is not None:
            _check_batch(rows, args, kwargs, "generate")
            stack.enter_context(routing(model, rows))
        _enter_settings(model, kwargs, stack)
        return generate(model, *args, **kwargs)


def _check_batch(rows: Any, args: tuple[Any, ...], kwargs: dict[str, Any], call: str) -> None:
    """The keyword must give one adapter per row of the call's batch (the first batched tensor)."""
    if isinstance(rows, str) or not isinstance(rows, Sequence):
        raise AdapterError(f"{call}: {KEYWORD}= takes a list with one adapter name (or None / '__base__' for the base) "
                           f"per batch row, got {rows!r}")
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() > 0), None)
    if first is not None and first.shape[0] != len(rows):
        raise AdapterError(f"{call}: {KEYWORD}= names {len(rows)} rows but the batch has {first.shape[0]}; give one "
                           "adapter name (or None for the base) per row")
