"""AdapterHub's composition blocks, pinned as docs/adapterhub.md states them: at model level (which rows
each adapter computes under Parallel and BatchSplit) and site by site with deltatune's block functions
(what each member reads and how the results combine under Stack, Parallel, BatchSplit and Average).

Under every block but Stack, AdapterHub runs the *first* member's pre step (site_input) for all members
and the *last* member's post step (site_output) on the combined result; the "mixed" members below differ
in those placement fields, so the site tests see it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from adapters.composition import Average, BatchSplit, Parallel, Stack
from oracle_models import ATOL, block_from, build, hidden_size, inputs, perturb, probe_sites
from torch import Tensor, nn

from deltatune.methods.bottleneck_block import BottleneckBlock, site_input, site_output

BATCH = 2
MEMBERS = {
    "same": (DoubleSeqBnConfig(reduction_factor=4), DoubleSeqBnConfig(reduction_factor=8, non_linearity="gelu",
                                                                      ln_after=True, scaling="learned")),
    "mixed": (DoubleSeqBnConfig(reduction_factor=4), SeqBnConfig(reduction_factor=8, non_linearity="gelu",
                                                                 mh_adapter=True, ln_after=True)),
    "parallel": (ParBnConfig(reduction_factor=4, mh_adapter=True), ParBnConfig(reduction_factor=8, mh_adapter=True,
                                                                               scaling="learned")),
}


def two_adapters(arch: str, kind: str = "same") -> nn.Module:
    model = build(arch)
    for name, config in zip("ab", MEMBERS[kind]):
        model.add_adapter(name, config=config)
    perturb(model)
    return model


def output(model: nn.Module, arch: str, setup: object, batch: int = BATCH) -> Tensor:
    model.set_active_adapters(setup)
    with torch.no_grad():
        result = model(**inputs(arch, batch=batch))
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama", "t5"])
def test_parallel_repeats_the_batch_once_per_adapter(arch: str) -> None:
    """Parallel(a, b) on a batch of B rows returns 2B rows: rows [0, B) are the model with a alone,
    rows [B, 2B) with b alone (the batch is repeated at the first adapter site and stays 2B after),
    when a and b have the same placement fields."""
    model = two_adapters(arch)
    alone = [output(model, arch, name) for name in "ab"]
    both = output(model, arch, Parallel("a", "b"))
    assert both.shape[0] == 2 * alone[0].shape[0]
    torch.testing.assert_close(both[:2], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[2:], alone[1], atol=ATOL, rtol=0)


def test_parallel_of_parallel_adapters_needs_batch_one() -> None:
    """adapters 1.3: Parallel over ParBn adapters adds the un-repeated sub-block output to the repeated
    batch, so it fails for B > 1 and is right only for B = 1 (broadcast)."""
    model = two_adapters("bert", "parallel")
    with pytest.raises(RuntimeError, match="must match the size"):
        output(model, "bert", Parallel("a", "b"))
    both, alone = output(model, "bert", Parallel("a", "b"), batch=1), [output(model, "bert", n, batch=1) for n in "ab"]
    torch.testing.assert_close(both, torch.cat(alone), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_batch_split_gives_each_adapter_its_rows(arch: str) -> None:
    model = two_adapters(arch)
    alone = [output(model, arch, name, batch=3) for name in "ab"]
    split = output(model, arch, BatchSplit("a", "b", batch_sizes=[1, 2]), batch=3)
    assert split.shape == alone[0].shape
    torch.testing.assert_close(split[:1], alone[0][:1], atol=ATOL, rtol=0)
    torch.testing.assert_close(split[1:], alone[1][1:], atol=ATOL, rtol=0)


def _stack(blocks: Sequence[BottleneckBlock], h: Tensor, x: Tensor, ln: nn.Module | None) -> Tensor:
    """Each member redoes its own pre step (original_ln_before adds x and normalises again) on the previous
    member's output; the last member's post step uses the site's original hidden_states."""
    current = h
    for block in blocks:
        adapter_input, _, residual = site_input(block, current, x, ln)
        current = block(adapter_input, residual)[0]
    return site_output(blocks[-1], current, h, x, ln)


def _average(weights: Sequence[float]) -> Callable[[Sequence[BottleneckBlock], Tensor, Tensor, nn.Module | None],
                                                    Tensor]:
    def combine(blocks: Sequence[BottleneckBlock], h: Tensor, x: Tensor, ln: nn.Module | None) -> Tensor:
        """The first member's pre step; torch.mean over members of weight * output (so the weighted sum
        divided by the member count, a serial adapter's residual included); the last member's post step."""
        adapter_input, _, residual = site_input(blocks[0], h, x, ln)
        outputs = torch.stack([block(adapter_input, residual)[0] for block in blocks])
        mean = torch.mean(outputs * torch.tensor(weights)[:, None, None, None], dim=0)
        return site_output(blocks[-1], mean, h, x, ln)
    return combine


def _rows(blocks: Sequence[BottleneckBlock], h: Tensor, x: Tensor, ln: nn.Module | None,
          sizes: Sequence[int]) -> Tensor:
    """BatchSplit / Parallel after the repeat: the first member's pre step on all rows, member i on its rows,
    the last member's post step on the concatenation."""
    adapter_input, _, residual = site_input(blocks[0], h, x, ln)
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    outputs = [block(adapter_input[a:b], residual[a:b])[0] for block, a, b in zip(blocks, starts, starts[1:])]
    return site_output(blocks[-1], torch.cat(outputs), h, x, ln)


def _parallel(blocks: Sequence[BottleneckBlock], h: Tensor, x: Tensor, ln: nn.Module | None) -> Tensor:
    if h.shape[0] == BATCH:  # the first site under Parallel: the batch is repeated once per member here
        h, x = h.repeat(len(blocks), 1, 1), x.repeat(len(blocks), 1, 1)
    return _rows(blocks, h, x, ln, [h.shape[0] // len(blocks)] * len(blocks))


def _batch_split(blocks: Sequence[BottleneckBlock], h: Tensor, x: Tensor, ln: nn.Module | None) -> Tensor:
    return _rows(blocks, h, x, ln, [1, BATCH - 1])


SETUPS: dict[str, tuple[object, Callable[..., Tensor]]] = {
    "stack": (Stack("a", "b"), _stack),
    "parallel": (Parallel("a", "b"), _parallel),
    "batch_split": (BatchSplit("a", "b", batch_sizes=[1, BATCH - 1]), _batch_split),
    "average": (Average("a", "b", weights=[1.0, 3.0]), _average([0.25, 0.75])),  # normalised to sum 1
    "average_unnormalized": (Average("a", "b", weights=[1.0, 3.0], normalize_weights=False), _average([1.0, 3.0])),
}
SITE_CASES = [(arch, kind, name) for arch in ("bert", "gpt2") for kind in ("mixed", "parallel") for name in SETUPS
              if (kind, name) != ("parallel", "parallel")]  # see test_parallel_of_parallel_adapters_needs_batch_one


@pytest.mark.parametrize(("arch", "kind", "name"), SITE_CASES)
def test_site_composition(arch: str, kind: str, name: str) -> None:
    setup, expected = SETUPS[name]
    model = two_adapters(arch, kind)
    model.set_active_adapters(setup)
    probe = probe_sites(model, arch)
    with torch.no_grad():
        model(**inputs(arch))
    probe.close()
    checked = 0
    for record in probe.records:
        members = [n for n in "ab" if n in record.adapter_layer.adapters]
        if len(members) < 2:
            continue
        blocks = [block_from(record.adapter_layer.adapters[n], model.adapters_config.get(n), record.layer_idx,
                             hidden_size(model)) for n in members]
        t = record.tensors
        with torch.no_grad():
            result = expected(blocks, t["hidden"], t["residual"], record.layer_norm)
        torch.testing.assert_close(result, t["result"], atol=ATOL, rtol=0)
        checked += 1
    assert checked
