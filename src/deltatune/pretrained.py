"""``model.save_pretrained(folder)`` writes the adapters while a model carries them.

transformers' ``Trainer.save_model``, its checkpoints, trl's trainers and most user code save a model
with its own ``save_pretrained``, which would store the whole adapted state dict: deltatune's wrapper
keys (``*.base_layer.weight``, ``*.deltas.<name>.*``) that a plain ``from_pretrained`` loads into a
broken model. So, like ``generate`` in ``routing``, the first attached adapter puts an instance-level
``save_pretrained`` in ``model.__dict__`` (the class is never changed) that writes what ``dt.save``
writes: peft's adapter folders, which ``from_pretrained``, ``PeftModel.from_pretrained`` and ``dt.load``
read back. ``dt.unload`` takes it away; the plain model then saves itself in full again.

The writer is registered by ``io`` (which imports this module's users: importing it here would be a cycle).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from .errors import AdapterError
from .state import STATE_ATTR

Saver = Callable[[nn.Module, "str | os.PathLike[str]"], object]
_SAVERS: list[Saver] = []


def register_saver(save: Saver) -> None:
    """Set the function ``save_pretrained`` calls (``io.save``)."""
    _SAVERS[:] = [save]


def accept_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write adapter folders (done when an adapter is attached); models
    without a ``save_pretrained`` (plain torch modules) are left alone. Found by identity, so a deep
    copy of the model saves itself."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = partial(save_pretrained, model)


def release_save(model: nn.Module) -> None:
    """Undo ``accept_save`` (when the adapters are unloaded)."""
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, partial) and current.func is save_pretrained:
        del model.__dict__["save_pretrained"]


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], is_main_process: bool = True,
                    state_dict: dict[str, Any] | None = None, push_to_hub: bool = False, **kwargs: Any) -> None:
    """Write ``model``'s adapters to ``save_directory`` as ``dt.save`` does (peft's format, a README.md card).
    The first parameters are transformers' own, in its order.

    ``is_main_process=False`` (other ranks of a distributed run) writes nothing, as transformers does.
    ``state_dict`` (what the Trainer passes under FSDP or DeepSpeed) is not used: the adapters are read
    from the model itself, so fully sharded parameters (ZeRO-3, FSDP) are not supported here; other
    keyword arguments of transformers' ``save_pretrained`` (shard size, serialization) do not apply to an
    adapter folder and are ignored. With no adapter left (all deleted), the class's own ``save_pretrained``
    saves the plain model in full.
    """
    state = model.__dict__.get(STATE_ATTR)
    if state is None or not state.configs:
        getattr(type(model), "save_pretrained")(model, save_directory, is_main_process=is_main_process,
                                                state_dict=state_dict, push_to_hub=push_to_hub, **kwargs)
        return
    if push_to_hub:
        raise AdapterError(f"save_pretrained({str(save_directory)!r}, push_to_hub=True): deltatune does not upload. "
                           "Fix: save without push_to_hub, then upload the folder (huggingface_hub's upload_folder). "
                           "Nothing was written.")
    if not is_main_process:
        return
    if not _SAVERS:
        raise AdapterError("save_pretrained: deltatune's writer is not registered; import deltatune (the package), "
                           "not only its submodules. Nothing was written.")
    _SAVERS[0](model, save_directory)
