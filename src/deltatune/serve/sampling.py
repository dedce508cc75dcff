"""Choosing each row's next token: greedy, or sampling with temperature and top-p from the row's own generator.

A request's random stream belongs to the request (seeded by its ``seed``, else at random), never to
the batch: the same seeded request gives the same tokens whoever else shares its batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How one request generates."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class NonFiniteScores(RuntimeError):
    """The model's scores for a row hold NaN: an adapter (or the input) broke the computation for that row."""


def generator_for(sampling: Sampling) -> torch.Generator | None:
    """The request's own random stream on the CPU (where rows are sampled); None for greedy decoding."""
    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else random.SystemRandom().getrandbits(63)
    return torch.Generator().manual_seed(seed)


def broken_rows(logits: Tensor) -> list[bool]:
    """Per row of ``(batch, vocab)`` scores: whether it holds a NaN (one check for the whole batch)."""
    flags: list[bool] = torch.isnan(logits).any(dim=-1).tolist()
    return flags


def choose(logits: Tensor, greedy_pick: int, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token of one row from its ``(vocab,)`` scores; ``greedy_pick`` is the row's argmax,
    computed for the whole batch at once."""
    if sampling.greedy or generator is None:
        return greedy_pick
    scores = logits.float().cpu() / sampling.temperature
    probs = torch.softmax(scores, dim=-1)
    if sampling.top_p < 1.0:
        probs = nucleus(probs, sampling.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (the most likely one always)."""
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ranked above each one
    ordered = torch.where(before < top_p, ordered, torch.zeros_like(ordered))
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum()
