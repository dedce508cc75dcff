"""What a site computes under a composition of bottleneck adapters, as AdapterHub computes it.

``dt.Stack``: each member's own pre step on the previous member's output, the last member's post
step. ``dt.Average``: the first member's pre step, the mean of ``w_i o_i`` with the weights
normalised to sum 1 (so the weighted sum divided by the number of members, AdapterHub's rule), the
last member's post step. ``dt.BatchSplit`` and ``dt.Route``: each member on its rows. A single adapter: pre step,
block, post step. Where the model adds the residual itself (pre-LN sites) the result leaves it out.
Where the model has computed ``LN(h + x)`` itself (post-LN sites: ``own``), a pre step that needs it
takes it rather than computing it again; a single Pfeiffer-placed adapter there runs fused
(``bottleneck_fused``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..compose import Active, Average, BatchSplit, Composition, Fuse, Parallel, Route, Stack, Sum
from ..errors import AdapterError
from ..sites import Norm
from .bottleneck_block import BottleneckBlock, FusionBlock, site_input, site_output
from .bottleneck_fused import fused_site


@runtime_checkable
class SiteFusion(Protocol):
    """An AdapterFusion attached to the model: its members, and its block at a site."""

    members: tuple[str, ...]

    def block_at(self, site: str) -> FusionBlock | None: ...


def run_site(active: Active, blocks: Mapping[str, BottleneckBlock], fusions: Mapping[tuple[str, ...], FusionBlock],
             h: Tensor, x: Tensor, norm: Norm | None, adds: bool, own: Tensor | None) -> Tensor | None:
    """The site's output under the active composition (None: no member has a block here); ``own`` is
    the model's ``LN(h + x)`` at a post-LN site (else None)."""
    composition = active.composition
    if isinstance(composition, Fuse):
        return _fuse(composition, blocks, fusions, h, x, norm, adds, own)
    return _evaluate(composition, blocks, h, x, norm, adds, own)


def _fuse(fuse: Fuse, blocks: Mapping[str, BottleneckBlock], fusions: Mapping[tuple[str, ...], FusionBlock],
          h: Tensor, x: Tensor, norm: Norm | None, adds: bool, own: Tensor | None) -> Tensor | None:
    """AdapterFusion: the last member's pre step, every member's block on its output, the fusion's
    attention over their scaled up-projections, the last member's post step."""
    names = tuple(m for m in fuse.members if isinstance(m, str))
    if len(names) != len(fuse.members) or names not in fusions:
        raise AdapterError(f"{fuse!r}: no fusion of exactly the adapters {list(names)} is attached here; attach "
                           f"dt.FusionConfig(adapter_names={list(names)}) first")
    members = [blocks[n] for n in names if n in blocks]
    if len(members) != len(names):
        return None
    fusion = fusions[names]
    a, query, r = site_input(members[-1], h, x, norm, fusion.query_before_ln, own)
    ups = torch.stack([block(a, r)[1] for block in members], dim=2)
    return _post(members[-1], fusion(query, ups, r), h, x, norm, adds)


def _evaluate(composition: Composition, blocks: Mapping[str, BottleneckBlock], h: Tensor, x: Tensor,
              norm: Norm | None, adds: bool, own: Tensor | None) -> Tensor | None:
    here = [blocks[n] for n in composition.names() if n in blocks]
    if not here:
        return None
    if isinstance(composition, Sum) and len(here) == 1 and not adds:
        fused = fused_site(here[0], h, x, norm, own)
        if fused is not None:
            return fused
    if isinstance(composition, Parallel):  # the inputs were repeated: member i gets the i-th copy
        composition = composition.split(h.shape[0])
    if isinstance(composition, Route):
        single = composition.single()
        if single is None:
            return _by_rows(composition.groups(h.shape[0], h.device), blocks, h, x, norm, adds, own)
        composition.repeats(h.shape[0])  # a batch that does not fit the route is refused
        return _evaluate(Sum(single), blocks, h, x, norm, adds, own)
    nested = [m for m in composition.members if not isinstance(m, str)]
    if nested or not isinstance(composition, (Sum, Stack, Average, BatchSplit)):
        raise AdapterError(f"{composition!r} is not supported at adapter sites yet: bottleneck adapters combine with "
                           "dt.Stack, dt.Average, dt.BatchSplit and dt.Parallel of adapter names")
    if isinstance(composition, BatchSplit):
        return _split(composition, blocks, h, x, norm, adds, own)
    if isinstance(composition, Stack):  # each member's own pre step, on the previous member's output
        out = h
        for block in here:  # the model's LN(h + x) serves the first member only
            a, _, r = site_input(block, out, x, norm, normed=own if out is h else None)
            out = block(a, r)[0]
        return _post(here[-1], out, h, x, norm, adds)
    a, _, r = site_input(here[0], h, x, norm, normed=own)
    if isinstance(composition, Average):  # AdapterHub: mean of w_i o_i, weights normalised to sum 1
        weights = [w for n, w in zip(composition.members, composition.weights) if n in blocks]
        total = sum(weights)
        out = torch.stack([block(a, r)[0] * (w / total) for block, w in zip(here, weights)]).mean(0)
    elif len(here) == 1:
        out = here[0](a, r)[0]
    else:
        raise AdapterError(f"{composition!r}: adapters {[n for n in composition.names() if n in blocks]} meet at one "
                           "site; a sum of bottleneck adapters is not defined. Use dt.Stack or dt.Average.")
    return _post(here[-1], out, h, x, norm, adds)


def _post(block: BottleneckBlock, out: Tensor, h: Tensor, x: Tensor, norm: Norm | None, adds: bool) -> Tensor:
    """AdapterHub's post step; where the model adds ``x`` itself (pre-LN: no site norm), the result
    leaves it out: the parallel sum, less ``x`` unless the post step would add it (``original_ln_after``)."""
    if not adds:
        return site_output(block, out, h, x, norm)
    out = out + h if block.is_parallel else out
    return out if block.original_ln_after else out - x


def _split(split: BatchSplit, blocks: Mapping[str, BottleneckBlock], h: Tensor, x: Tensor, norm: Norm | None,
           adds: bool, own: Tensor | None) -> Tensor:
    if sum(split.sizes) != h.shape[0]:
        raise AdapterError(f"{split!r}: the sizes add up to {sum(split.sizes)} rows but the batch has {h.shape[0]}")
    starts = [sum(split.sizes[:i]) for i in range(len(split.sizes))]
    groups = [(str(name), torch.arange(start, start + size, device=h.device))
              for name, start, size in zip(split.members, starts, split.sizes)]
    return _by_rows(groups, blocks, h, x, norm, adds, own)


def _by_rows(groups: list[tuple[str, Tensor]], blocks: Mapping[str, BottleneckBlock], h: Tensor, x: Tensor,
             norm: Norm | None, adds: bool, own: Tensor | None) -> Tensor:
    """Each adapter on its rows (index tensors), the model's own result on the rest."""
    if adds:  # the model's own result
        out = h
    elif own is not None:
        out = own
    else:
        out = h + x if norm is None else norm(h + x)
    for name, rows in groups:
        if name not in blocks or not rows.numel():
            continue
        mine = None if own is None else own.index_select(0, rows)
        result = _evaluate(Sum(name), blocks, h.index_select(0, rows), x.index_select(0, rows), norm, adds, mine)
        if result is not None:
            out = out.index_copy(0, rows, result.to(out.dtype))
    return out
