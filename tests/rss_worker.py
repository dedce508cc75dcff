"""One rank of ``deltatune`` under torchrun (tests/test_fsdp_meta.py): ``rss_worker.py OUT [--full-load] ARGS...``
runs the command with ARGS and writes this process's peak resident memory (KiB, ``ru_maxrss``) to
``OUT/rss<RANK>.json``: once the model is loaded and sharded (before FSDP2 first gathers a unit: on the CPU its
gather buffers, ~2.5 times the largest unit, then live in the same memory) and at the end.
``--full-load``: every rank loads the whole model, as ``--fsdp`` did before meta initialisation."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from torch import nn

from deltatune.cli import main
from deltatune.train import fsdp
from deltatune.train import run as run_module

PEAKS: dict[str, int] = {}


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


GATHER = fsdp._allocate_gather_buffers


def first_gather(model: nn.Module) -> None:
    """fsdp.shard's first gathers, the peak noted before them (the model is loaded and sharded by then)."""
    PEAKS["sharded"] = peak()
    GATHER(model)


def run(out: Path, args: list[str]) -> int:
    if args[0] == "--full-load":
        args = args[1:]
        run_module.meta_init = lambda *_: False  # type: ignore[assignment]
    fsdp._allocate_gather_buffers = first_gather
    code = main(args)
    PEAKS["end"] = peak()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rss{os.environ['RANK']}.json").write_text(json.dumps(PEAKS))
    return code


if __name__ == "__main__":
    raise SystemExit(run(Path(sys.argv[1]), sys.argv[2:]))
