"""The key/value cache of the running batch: rows join (merged in, left-padded) and leave (dropped) between steps.

Rows are left-aligned to the end: every row's newest token sits in the last column, and a row shorter
than the batch has masked padding columns on the left. That is what transformers' generate does for a
left-padded batch, so a decode step is one ordinary forward with an attention mask and per-row
positions. Joining pads the shorter side on the left; leaving drops rows and then the leading
columns that only padding still fills. Only plain dynamic caches (every layer keeps all its keys) can
be cut and joined like this; a sliding-window layer cannot, and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hf import filled_cache

Pairs = list[tuple[Tensor, Tensor]]


@dataclass
class KvBatch:
    """A transformers cache of ``rows`` rows and the ``(rows, columns)`` mask of its real (1) and padding (0) columns."""

    cache: Any
    mask: Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def lengths(self) -> Tensor:
        """Real tokens per row: the position the row's next token takes."""
        return self.mask.sum(dim=1)


def pairs_of(cache: Any) -> Pairs:
    """(keys, values) per layer, each ``(rows, heads, columns, head_dim)``; refuses caches that cannot be cut."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} is not a transformers layered cache; serving needs DynamicCache")
    pairs = []
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not isinstance(getattr(layer, "keys", None), Tensor):
            raise TypeError(f"the model's cache has a {type(layer).__name__} layer; batching rows that join and leave "
                            "needs every layer to keep all its keys (no sliding window)")
        pairs.append((layer.keys, layer.values))
    return pairs


def _left_pad(t: Tensor, columns: int) -> Tensor:
    missing = columns - t.shape[-2]
    return F.pad(t, (0, 0, missing, 0)) if missing else t


def _pad_mask(mask: Tensor, columns: int) -> Tensor:
    missing = columns - mask.shape[1]
    return F.pad(mask, (missing, 0)) if missing else mask


def merge(a: KvBatch | None, b: KvBatch) -> KvBatch:
    """``a``'s rows then ``b``'s, in one cache as wide as the wider of the two."""
    if a is None:
        return b
    columns = max(a.mask.shape[1], b.mask.shape[1])
    pairs = [(torch.cat([_left_pad(ka, columns), _left_pad(kb, columns)]),
              torch.cat([_left_pad(va, columns), _left_pad(vb, columns)]))
             for (ka, va), (kb, vb) in zip(pairs_of(a.cache), pairs_of(b.cache), strict=True)]
    mask = torch.cat([_pad_mask(a.mask, columns), _pad_mask(b.mask, columns)])
    return KvBatch(filled_cache(pairs, False), mask)


def select(batch: KvBatch, keep: list[int]) -> KvBatch | None:
    """Only the rows ``keep`` (in that order), without the leading columns left all padding; None for no rows."""
    if not keep:
        return None
    if keep == list(range(batch.rows)):
        return batch
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    pairs = [(k.index_select(0, index.to(k.device))[:, :, first:], v.index_select(0, index.to(v.device))[:, :, first:])
             for k, v in pairs_of(batch.cache)]
    return KvBatch(filled_cache(pairs, False), mask[:, first:])


def crop(batch: KvBatch) -> None:
    """Cut every layer back to the mask's width: undoes a step that failed after some layers had grown."""
    columns = batch.mask.shape[1]
    for layer in getattr(batch.cache, "layers", []):
        if isinstance(getattr(layer, "keys", None), Tensor) and layer.keys.shape[-2] > columns:
            layer.keys, layer.values = layer.keys[:, :, :columns], layer.values[:, :, :columns]
