"""Sharded training with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), chosen by ``TrainConfig.fsdp``.

:func:`shard` wraps every transformer block, then the root, once the adapter is attached: each rank
then keeps ``1 / world size`` of every parameter (the frozen base and the adapter alike) as a
``DTensor`` shard. FSDP2 gathers a block's parameters for its forward and backward and frees them
after, and reduce-scatters (averages) the gradients of the trainable ones in backward, so the
trainer's own all-reduce is not used. Every rank must then take part in every forward (evaluation
included) and in every gather of the adapter (``dt.save``, ``io.gathered``).

``fully_shard`` shards parameters only. A 4-bit base (``dt.quantize``) keeps its packed codes and
scales in buffers, so they stay whole on every rank (frozen, read in place, never gathered or
reduced) while the float parameters around them (embeddings, norms, head, adapter) are sharded.

Initialised on the ``meta`` device (``deltatune train --fsdp``: see ``run.py``), only rank 0 holds the
weights: the other ranks build the architecture and the adapter on ``meta``, are sharded as empty
shells, then allocate their shards and receive them from rank 0 tensor by tensor
(``set_model_state_dict(..., broadcast_from_rank0=True)``), so no rank but 0 ever holds the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import TrainingError
from . import distributed

NO_SPLIT_ATTR = "_no_split_modules"
"""The class names of a transformers model's blocks (what its device map never splits)."""
SHARDED_HERE = "_deltatune_fsdp"
"""Set on a model :func:`shard` sharded, so that the trainer's ``--fsdp`` takes it as it is."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes it names in ``_no_split_modules`` (transformers models),
    else the members of its ``ModuleList``s of two or more modules of one type."""
    names = set(getattr(model, NO_SPLIT_ATTR, None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) and len(lst) > 1
            and len({type(x) for x in lst}) == 1 for m in lst]


def policy(bf16: bool) -> MixedPrecisionPolicy:
    """bf16 parameters for the gathered forward/backward with fp32 gradient reduction (``--bf16``), else fp32."""
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()


def shard(model: nn.Module, trainable: Sequence[nn.Parameter], bf16: bool,
          device: torch.device | None = None) -> None:
    """Shard ``model`` in place across the ranks of the process group (each block, then the root).

    The trainable parameters are made equal on every rank first (each rank keeps its slice of its own
    copy); the optimizer must be built afterwards, on the sharded parameters. Where the ranks other than 0
    hold ``model`` on the ``meta`` device, they allocate their shards on ``device`` and receive them (the
    frozen base and the adapter alike) from rank 0's whole model.
    """
    world = distributed.current()
    if not world.distributed:
        raise TrainingError("--fsdp needs several processes: start the run with torchrun --nproc_per_node N "
                            "(on one process, train without --fsdp)")
    if isinstance(model, FSDPModule):
        raise TrainingError("the model is already sharded (fully_shard); pass it unsharded with --fsdp, "
                            "or shard it yourself and train without --fsdp")
    meta = _initialised_on_meta(model, device)
    whole: dict[str, Any] = model.state_dict() if meta and world.main else {}  # rank 0's, sent out tensor by tensor
    if not meta:
        distributed.broadcast_parameters(list(trainable))
    mp = policy(bf16)
    for block in blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if meta and device is not None:
        _materialise(model, whole, device)
    setattr(model, SHARDED_HERE, True)
    _allocate_gather_buffers(model)


def sharded_here(model: nn.Module) -> bool:
    """Whether :func:`shard` sharded ``model`` already (the command line shards before building the trainer)."""
    return bool(getattr(model, SHARDED_HERE, False))


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _initialised_on_meta(model: nn.Module, device: torch.device | None) -> bool:
    """Whether the ranks other than 0 hold ``model`` on the meta device, agreed by all (a collective).
    Rank 0 must hold the weights, every rank the same architecture (names, shapes, dtypes)."""
    flags = distributed.all_gather_object(_on_meta(model))
    if not any(flags):
        return False
    if flags[0] or device is None:
        raise TrainingError("a model on the meta device can be sharded only when rank 0 holds its weights and "
                            "a device to allocate the shards on is given (fsdp.shard(..., device=...))")
    layouts = distributed.all_gather_object([(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()])
    differ = [rank for rank, layout in enumerate(layouts) if layout != layouts[0]]
    if differ:
        raise TrainingError(f"rank(s) {differ} built the model on the meta device with other tensors (names, shapes "
                            "or dtypes) than rank 0 loaded; load the same model with the same options on every rank")
    return True


def _materialise(model: nn.Module, whole: dict[str, Any], device: torch.device) -> None:
    """Give the meta ranks their shards of rank 0's ``whole`` state dict (one tensor in flight at a time),
    and rank 0's copies of what the state dict leaves out: non-persistent buffers (rotary ``inv_freq``:
    ``to_empty`` leaves them uninitialised) and the random generators' states (rank 0's weight loading drew
    from them, the meta build did not; the ranks of a run fully loaded on each rank start equal)."""
    if not distributed.current().main:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    saved = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in saved:
            dist.broadcast(buffer, src=0)
    torch.set_rng_state(distributed.broadcast_object(torch.get_rng_state()))
    if device.type == "cuda":
        torch.cuda.set_rng_state(distributed.broadcast_object(torch.cuda.get_rng_state(device)), device)


def _allocate_gather_buffers(model: nn.Module) -> None:
    """Gather and free each unit once, outside inference mode. FSDP2 creates a unit's gather buffers on its
    first gather and reuses them: created under ``torch.inference_mode`` (a task's evaluation, e.g. the one
    before training) they are inference tensors, and the next training forward fails ("Inplace update to
    inference tensor outside InferenceMode")."""
    with torch.inference_mode(False):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in this backward (the last micro-batch of a step) or keep accumulating."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)



def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


@contextmanager
def whole_trainables(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """For the block, the trainable parameters (the adapter) are plain, whole tensors on every rank, so the
    one-process code (checkpoint writing, restoring) reads and writes them as it would there.

    A collective: every rank enters. Each gathers the sharded ones and registers the whole values in their
    place; on exit the shards are registered again, and with ``write_back`` first receive their slice of
    the (possibly changed) whole values. No forward may run inside the block.
    """
    swapped: list[tuple[nn.Module, str, DTensor, nn.Parameter]] = []
    for name, param in list(model.named_parameters()):
        if param.requires_grad and isinstance(param, DTensor):
            owner, attr = _owner(model, name)
            whole = nn.Parameter(param.full_tensor().detach().clone(), requires_grad=True)
            owner._parameters[attr] = whole
            swapped.append((owner, attr, param, whole))
    try:
        yield
    finally:
        for owner, attr, shard_, whole in swapped:
            owner._parameters[attr] = shard_  # type: ignore[assignment]  # FSDP2 registers DTensor parameters
            if write_back:
                with torch.no_grad():
                    shard_.to_local().copy_(_slice(whole.detach(), shard_))


def _slice(value: Tensor, like: DTensor) -> Tensor:
    """This rank's part of the whole ``value``, laid out as ``like``'s local shard."""
    return distribute_tensor(value, like.device_mesh, like.placements).to_local()


def _param_by_index(optimizer: torch.optim.Optimizer) -> dict[int, Tensor]:
    """The optimizer's parameters by their index in its state_dict (the order of its param groups)."""
    return dict(enumerate(p for group in optimizer.param_groups for p in group["params"]))


def gather_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (a collective: every rank calls
    this): the form a one-process run stores, so a checkpoint reads the same whatever wrote it."""
    params = _param_by_index(optimizer)
    gathered = {index: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in entry.items()}
                for index, entry in state["state"].items() if isinstance(params.get(index), DTensor)}
    return {**state, "state": {**state["state"], **gathered}}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of whole (one-process form) states: each rank keeps its slice of the
    states of sharded parameters, as DTensors laid out like the parameter."""
    for param in _param_by_index(optimizer).values():
        if not isinstance(param, DTensor):
            continue
        entry = optimizer.state.get(param, {})
        for key, value in entry.items():
            if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                entry[key] = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
