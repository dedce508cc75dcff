"""Hot-swap (``dt.hotswap``, ``dt.load(..., replace=True)``, ``dt.prepare_hotswap``): values replaced in place.

What is checked: outputs equal a fresh model with the new adapter loaded normally; the tensor objects
stay (identity and storage), so an optimizer keeps working and a compiled model does not recompile
(also for a smaller rank in a padded slot and another alpha); a refused swap leaves the model bit for
bit as it was; a save after a swap writes the swapped adapter at its own rank, which peft reads; a
method without ranks (IA3, a bottleneck adapter) swaps by plain copy.

On tolerances: a swap at equal shapes computes exactly what a fresh load computes (0.0 measured;
checked at 1e-6). A padded slot computes the same sum with extra exact zeros, but the CPU matrix
kernels accumulate an (N, 2) and an (N, 8) product in other orders, so in fp32 it differs from an
unpadded model by rounding (about 2e-6 on these logits, within ``TOLERANCES``); padded swaps are
therefore compared with a fresh load padded alike (same kernels: 1e-6), and the padding itself is
checked to be exact in fp64 (1e-12), where the rounding is far below it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TOLERANCES, conv_net, perturb, state_hash, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterError, AdapterFileError

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
EXACT = 1e-6


def _save_adapter(folder: Path, config: dt.DeltaConfig, seed: int, model: Callable[[], nn.Module] = tiny_llama) -> Path:
    """An adapter of ``config`` with seeded non-trivial values, saved to ``folder``."""
    base = model()
    dt.attach(base, config)
    perturb(base, seed)
    dt.save(base, folder)
    return folder


def _lora(r: int, alpha: float, **fields: Any) -> dt.LoraConfig:
    return dt.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False, **fields)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved adapters: LoRA at ranks 2, 4 and 8 with different alphas (one rsLoRA), and ones that cannot go
    into a rank-4 all-linear LoRA slot for one reason each."""
    root = tmp_path_factory.mktemp("hotswap")
    specs: dict[str, dt.DeltaConfig] = {
        "r4": _lora(4, 8),
        "r4b": _lora(4, 16, lora_dropout=0.0),
        "causal": _lora(4, 8, task_type="CAUSAL_LM"),  # changes no computation here: may differ
        "r8": _lora(8, 32),
        "r2": _lora(2, 3, use_rslora=True),
        "qv": dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "dora": _lora(4, 8, use_dora=True),
        "dropout": _lora(4, 8, lora_dropout=0.1),
        "dropout2": _lora(4, 8, lora_dropout=0.05),
        "ia3": dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False),
    }
    return {name: _save_adapter(root / name, config, seed) for seed, (name, config) in enumerate(specs.items(), 1)}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _fresh(folder: Path, target_rank: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The logits of a new model with ``folder`` loaded normally (and padded to ``target_rank``)."""
    model = tiny_llama().to(dtype)
    dt.load(model, folder)
    if target_rank is not None:
        dt.prepare_hotswap(model, target_rank=target_rank)
    return _logits(model)


def _scales(model: nn.Module) -> list[float]:
    """Every delta's scale (not in the state dict: a plain number, or a buffer left out of it)."""
    return [float(m.scaling) for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "slot_rank")]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


SWAPS: dict[str, Callable[..., nn.Module]] = {
    "hotswap": dt.hotswap,
    "load_replace": lambda model, folder, name="default", **kw: dt.load(model, folder, name, replace=True, **kw),
}


@pytest.mark.parametrize("swap", SWAPS)
def test_swap_equals_a_fresh_load(folders: dict[str, Path], swap: str) -> None:
    assert _max_diff(_fresh(folders["r4"]), _fresh(folders["r4b"])) > 1e-2  # the adapters differ
    model = tiny_llama()
    dt.load(model, folders["r4"])
    for name in ("r4b", "causal", "r4"):  # another alpha, another task type, then back
        SWAPS[swap](model, folders[name])
        assert _max_diff(_logits(model), _fresh(folders[name])) <= EXACT
    model_small = tiny_llama()
    dt.load(model_small, folders["r4"])
    SWAPS[swap](model_small, folders["r2"])  # a smaller rank into an unprepared slot, rsLoRA on
    assert _max_diff(_logits(model_small), _fresh(folders["r2"], target_rank=4)) <= EXACT


def test_a_new_nonzero_dropout_rate_is_taken(folders: dict[str, Path]) -> None:
    model = tiny_llama()
    dt.load(model, folders["dropout"])
    dt.hotswap(model, folders["dropout2"])
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0}
    assert rates == {0.05}
    assert _max_diff(_logits(model), _fresh(folders["dropout2"])) <= EXACT


def test_swap_keeps_tensor_objects_and_the_optimizer_keeps_working(folders: dict[str, Path]) -> None:
    model = tiny_llama()
    dt.load(model, folders["r4"], trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    before = {id(p): p.data_ptr() for p in params}
    optimizer = torch.optim.Adam(params, lr=1e-3)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    dt.hotswap(model, folders["r4b"], trainable=True)
    assert [p for p in model.parameters() if p.requires_grad] == params
    assert {id(p): p.data_ptr() for p in params} == before
    swapped = {k: v.clone() for k, v in model.state_dict().items()}
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, swapped[k])]
    assert changed and all(".deltas.default." in k for k in changed)


def test_prepare_keeps_outputs_exact_in_float64_and_within_rounding_in_float32(folders: dict[str, Path]) -> None:
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, TOLERANCES[torch.float32]["atol"])):
        model = tiny_llama().to(dtype)
        dt.load(model, folders["r4"])
        dt.prepare_hotswap(model, target_rank=8)
        assert _max_diff(_logits(model), _fresh(folders["r4"], dtype=dtype)) <= tolerance
        dt.hotswap(model, folders["r2"])
        assert _max_diff(_logits(model), _fresh(folders["r2"], dtype=dtype)) <= tolerance


def test_padded_slots_on_embeddings_and_convolutions(tmp_path: Path) -> None:
    """Every base kind pads its own factor layout (A ``(r, in, *kernel)``, B ``(out, r, 1, ...)``): ranks 2
    and 4 swap through a rank-6 slot, outputs as fresh loads (fp64: padding exact to rounding far below
    1e-12), and a save writes each adapter's own tensors."""
    def model() -> nn.Module:
        return conv_net().double()

    ids = torch.randint(1, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    targets = ["embed", "conv1", "conv2", "pointwise", "head"]
    folders = [_save_adapter(tmp_path / f"r{r}", dt.LoraConfig(r=r, lora_alpha=r + 1, target_modules=targets,
                                                               init_lora_weights=False), r, model) for r in (2, 4)]
    live = model()
    dt.load(live, folders[0])
    dt.prepare_hotswap(live, target_rank=6)
    for folder in (folders[1], folders[0]):
        dt.hotswap(live, folder)
        fresh = model()
        dt.load(fresh, folder)
        with torch.no_grad():
            assert _max_diff(live(ids), fresh(ids)) <= 1e-12
        dt.save(live, tmp_path / "out")
        saved, original = (load_file(f / "adapter_model.safetensors") for f in (tmp_path / "out", folder))
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


@pytest.mark.parametrize("training", [False, True])
def test_compiled_model_does_not_recompile_across_swaps(folders: dict[str, Path], training: bool) -> None:
    """A rank-4 adapter in a slot padded to 8, compiled; rank 8 (alpha 32), rank 2 (rsLoRA, alpha 3) and
    rank 4 again go in: one compiled frame throughout, outputs as a fresh padded load."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = tiny_llama()
    dt.load(model, folders["r4"], trainable=training)
    dt.prepare_hotswap(model, target_rank=8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager" if training else "eager")
    compiled = torch.compile(model, backend=counter)

    def run() -> torch.Tensor:
        if not training:
            return _logits(compiled)
        out = compiled(input_ids=IDS, labels=IDS)
        out.loss.backward()
        return out.logits.detach()

    run()
    frames = counter.frame_count
    assert frames >= 1
    for name in ("r8", "r2", "r4"):
        dt.hotswap(compiled, folders[name], trainable=training)  # the compiled wrapper itself is accepted
        assert _max_diff(run(), _fresh(folders[name], target_rank=8)) <= EXACT, name
    assert counter.frame_count == frames
    torch._dynamo.reset()


def _unchanged_after(model: nn.Module, call: Callable[[], object], error: type[Exception], match: str) -> None:
    """``call`` raises ``error`` matching ``match`` and leaves the model as it was, bit for bit."""
    state, scales, configs = state_hash(model), _scales(model), dict(model.deltatune_state.configs)
    with pytest.raises(error, match=match):
        call()
    assert state_hash(model) == state and _scales(model) == scales and dict(model.deltatune_state.configs) == configs


REFUSALS: dict[str, tuple[str, type[Exception], str]] = {
    # case: (folder, error, what the message must say)
    "other targets": ("qv", AdapterFileError, r"targets other layers.*slot does not have.*missing"),
    "larger rank": ("r8", AdapterFileError,
                    r"layer 'model.layers.0.self_attn.q_proj'.*rank 8 here.*\(8, 32\).*room for rank 4.*\(4, 32\).*"
                    r"dt.prepare_hotswap\(model, target_rank=8\)"),
    "other method": ("ia3", AdapterFileError, r"holds a IA3 adapter but adapter 'default' is LORA"),
    "other variant": ("dora", AdapterFileError, r"use_dora: False in the slot, True in the folder"),
    "dropout on": ("dropout", AdapterFileError, r"lora_dropout: 0.0 in the slot, 0.1 in the folder"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_swap_leaves_the_model_unchanged(folders: dict[str, Path], case: str) -> None:
    folder, error, match = REFUSALS[case]
    model = tiny_llama()
    dt.load(model, folders["r4"])
    _unchanged_after(model, lambda: dt.hotswap(model, folders[folder]), error, match)


def test_refusals_without_a_slot_or_with_broken_files(folders: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_llama()
    dt.load(model, folders["r4"])
    _unchanged_after(model, lambda: dt.hotswap(model, folders["r4b"], name="nope"), AdapterError,
                     r"no adapter named 'nope'.*\['default'\]")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((folders["r4b"] / "adapter_config.json").read_text())
    tensors = load_file(folders["r4b"] / "adapter_model.safetensors")
    missing = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, broken / "adapter_model.safetensors")
    _unchanged_after(model, lambda: dt.hotswap(model, broken), AdapterFileError, r"missing tensor.*o_proj.lora_B")
    dt.merge(model)
    _unchanged_after(model, lambda: dt.hotswap(model, folders["r4b"]), AdapterError, r"merged.*dt.unmerge")


def test_prepare_refusals(folders: dict[str, Path]) -> None:
    model = tiny_llama()
    dt.load(model, folders["r8"])
    _unchanged_after(model, lambda: dt.prepare_hotswap(model, target_rank=4), AdapterError,
                     r"target_rank=4 is smaller than the rank adapter 'default' already holds.*\(8;.*target_rank >= 8")
    _unchanged_after(model, lambda: dt.prepare_hotswap(torch.compile(model), target_rank=16), AdapterError,
                     r"already compiled")
    ia3 = tiny_llama()
    dt.load(ia3, folders["ia3"])
    _unchanged_after(ia3, lambda: dt.prepare_hotswap(ia3, target_rank=16), AdapterError, r"no layer.*rank to pad")


def test_save_after_swap_writes_the_adapter_at_its_rank_for_peft(folders: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    model = tiny_llama()
    dt.load(model, folders["r4"])
    dt.prepare_hotswap(model, target_rank=8)
    dt.hotswap(model, folders["r2"])
    dt.save(model, tmp_path / "out")
    read = json.loads  # the saved config is the swapped adapter's, as it was saved first
    assert read((tmp_path / "out/adapter_config.json").read_text()) == read(
        (folders["r2"] / "adapter_config.json").read_text())
    saved = load_file(tmp_path / "out/adapter_model.safetensors")
    original = load_file(folders["r2"] / "adapter_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
    assert _max_diff(_logits(peft_model), _fresh(folders["r2"])) <= EXACT  # the same adapter, unpadded
    assert _max_diff(_logits(peft_model), _logits(model)) <= TOLERANCES[torch.float32]["atol"]  # padded: rounding


@pytest.mark.parametrize("method", ["ia3", "bottleneck"])
def test_methods_without_ranks_swap_by_plain_copy(tmp_path: Path, method: str) -> None:
    def config() -> dt.DeltaConfig:
        if method == "ia3":
            return dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        return dt.SeqBnConfig(reduction_factor=4)

    first, second = (_save_adapter(tmp_path / str(seed), config(), seed) for seed in (1, 2))
    assert _max_diff(_fresh(first), _fresh(second)) > 1e-3
    model = tiny_llama()
    dt.load(model, first)
    tensors = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    dt.prepare_hotswap(model)  # nothing to prepare: a no-op
    dt.hotswap(model, second)
    assert {n: (p, p.data_ptr()) for n, p in model.named_parameters()} == tensors
    assert _max_diff(_logits(model), _fresh(second)) <= EXACT


def test_swap_rewrites_trained_biases_and_removal_restores_the_base(tmp_path: Path) -> None:
    """A LoRA adapter that trains biases writes them into the base; a swap writes the new ones in place and
    removing the adapter afterwards still restores the original biases."""
    config = dt.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only", init_lora_weights=False)
    first, second = (_save_adapter(tmp_path / str(seed), config, seed, tiny_gpt2) for seed in (1, 2))
    model = tiny_gpt2()
    original = state_hash(model)
    dt.load(model, first)
    dt.hotswap(model, second)
    reference = tiny_gpt2()
    dt.load(reference, second)
    assert _max_diff(_logits(model), _logits(reference)) <= EXACT
    dt.delete_adapter(model, "default")
    assert state_hash(model) == original
