"""Data-parallel training on ``torch.distributed``: the world torchrun describes, and the few collectives
the trainer needs.

torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``) starts one process per rank. :func:`process_group` initialises the group with the
backend that fits the device (gloo on CPU, NCCL on CUDA) and destroys it again on exit, also when
the run fails. Without those variables (or with ``WORLD_SIZE=1``) the world is one process and every
function here is a no-op, so the single-process trainer pays nothing.

Only the trainable (adapter) gradients travel: :func:`all_reduce_mean` averages them in one flat
bucket per step; the frozen base never leaves its process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import TrainingError

TIMEOUT_ENV = "DELTATUNE_DIST_TIMEOUT"
"""Seconds a collective waits for the other ranks before the run fails (default 1800, as torch's)."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise TrainingError(f"the environment variable {name}={value!r} is not a whole number; "
                            "start the run with torchrun, which sets it") from None


def world_from_env() -> World:
    """The world torchrun describes in the environment (one process when it describes none)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if not 0 <= rank < size:
        raise TrainingError(f"RANK={rank} is outside WORLD_SIZE={size}; start the run with torchrun")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def current() -> World:
    """The world of the initialised process group, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    return World()


def device_for(world: World, requested: str = "") -> torch.device:
    """The device of this rank: ``requested`` if given, else its own GPU (``cuda:LOCAL_RANK``) or the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank) if world.distributed else torch.device("cuda")
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def timeout() -> timedelta:
    seconds = _env_int(TIMEOUT_ENV, 1800)
    if seconds <= 0:
        raise TrainingError(f"{TIMEOUT_ENV}={seconds}: give a positive number of seconds")
    return timedelta(seconds=seconds)


def start(device: torch.device) -> bool:
    """Initialise the process group the environment describes; True when this call did (and must end it).

    Nothing happens for a one-process world or when the caller already initialised a group.
    """
    world = world_from_env()
    if not world.distributed or dist.is_initialized():
        return False
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise TrainingError(f"WORLD_SIZE={world.size} but {name} is not set; start the run with torchrun "
                                "(torchrun --nproc_per_node N ...), which sets the rendezvous address")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size, timeout=timeout())
    return True


def stop() -> None:
    """Destroy the process group (if any); safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a run that went well: wait for every rank, then destroy the process group.

    The barrier protects the process's exit. gloo's worker threads drop their references to a collective's
    tensors shortly after the caller has its result; a drop that comes while Python shuts down needs the
    interpreter's lock, which is gone, and aborts the process ("terminate called without an active
    exception", an open torch problem). A barrier after the last collective gives them that time. Not for
    a failed run: a rank that died never arrives, and the others would wait for the whole timeout.
    """
    barrier()
    stop()


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """The world of this process, with its process group up for the block and torn down after it."""
    owned = start(device)
    try:
        yield current()
    except BaseException:
        if owned:
            stop()
        raise
    if owned:
        finish()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over every rank (fp64, so counts and sums stay exact)."""
    if not current().distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def all_reduce_mean(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over every rank, in one flat bucket (one collective per step).

    A parameter without a gradient on this rank sends zeros; the bucket also carries, per parameter,
    how many ranks had one, so a parameter no rank used keeps no gradient (and the optimizer skips it,
    as it would in one process).
    """
    world = current()
    if not world.distributed or not params:
        return
    device = params[0].device
    # one fp32 bucket on one device, whatever the parameters' dtypes (an adapter is small)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).to(device, torch.float32) for p in params]
    had = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = _flatten_dense_tensors([*grads, had])
    dist.all_reduce(flat)
    *synced, used = _unflatten_dense_tensors(flat, [*grads, had])
    for param, grad, users in zip(params, synced, used.tolist()):
        param.grad = (grad / world.size).to(param.device, param.dtype) if users else None


@torch.no_grad()
def broadcast_parameters(params: Sequence[Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every rank (the adapters start equal however they were made)."""
    if not current().distributed or not params:
        return
    flat = _flatten_dense_tensors([p.detach() for p in params])
    dist.broadcast(flat, src=0)
    for param, value in zip(params, _unflatten_dense_tensors(flat, list(params))):
        param.copy_(value)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object: metrics, a flag)."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    world = current()
    if not world.distributed:
        return [value]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written the adapter)."""
    if current().distributed:
        dist.barrier()
