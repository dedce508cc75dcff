"""The invariant battery for methods that act on a whole model rather than one layer: bottleneck
adapters (module-output sites) and the prompt-space methods (input and key/value sites).

The layer battery (test_invariants.py, battery_cases.py) runs every weight-space method on one
layer of every base kind; these methods need a transformer around them, so their rows run on tiny
GPT-2 and LLaMA models in fp32 and bf16. The same promises are checked: the identity init where
the method promises one, save -> load into a fresh base gives the same outputs, ``dt.disabled``
gives the base exactly, the trainable count equals the method's formula (in the dtype the method
keeps over a half-precision base), gradients reach the adapter and nothing else, merging is refused (no weight
to fold into), and a failed load or merge leaves the model bit for bit as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import deltatune as dt
from deltatune.state import state_of
from conftest import state_hash, token_ids
from prompt_models import gpt2, llama, perturb_trainable

MODELS: dict[str, Callable[[], nn.Module]] = {"gpt2": gpt2, "llama": llama}
DTYPES = [torch.float32, torch.bfloat16]
N = 3
"""Virtual tokens of the prompt-space rows."""
E = 16
"""Encoder width of the reparameterised prompt-space rows."""


def _sites(model: nn.Module) -> int:
    """Transformer blocks of the tiny model (one bottleneck site per block and placement)."""
    return int(model.config.num_hidden_layers)


def _width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _bottleneck(per_block: int, rf: int) -> Callable[[nn.Module, Any], int]:
    """Down (h -> h/rf) and up (h/rf -> h) projections with biases, ``per_block`` sites per block."""
    def count(model: nn.Module, config: Any) -> int:
        h = _width(model)
        b = h // rf
        return per_block * _sites(model) * (h * b + b + b * h + h)
    return count


def _prompt_table(model: nn.Module, config: Any) -> int:
    return int(config.num_virtual_tokens * config.token_dim)


def _prompt_mlp(model: nn.Module, config: Any) -> int:
    h = int(config.token_dim)
    return _prompt_table(model, config) + (h * E + E) + (E * E + E) + (E * h + h)


def _prefix_deep(model: nn.Module, config: Any) -> int:
    """P-tuning v2: a key and a value row per layer and virtual token, at the key/value width."""
    return int(config.num_virtual_tokens * config.num_layers * 2 * _kv_width(model))


def _prefix_projected(model: nn.Module, config: Any) -> int:
    h, out = int(config.token_dim), int(config.num_layers * 2 * _kv_width(model))
    return int(config.num_virtual_tokens * h) + (h * E + E) + (E * out + out)


def _kv_width(model: nn.Module) -> int:
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    return _width(model) // heads * kv_heads


@dataclass(frozen=True)
class Row:
    """One model-level method setting: its config, its parameter formula, whether it starts as the identity."""

    name: str
    make: Callable[[], dt.DeltaConfig]
    count: Callable[[nn.Module, Any], int]
    identity: bool
    fp32_over_half: bool = True
    """Trained in fp32 over a half-precision base (peft's rule); False: in the base's dtype, as
    AdapterHub's bottleneck modules, which live in the model and follow ``model.to(dtype)``."""

    def __repr__(self) -> str:
        return self.name


ROWS = [
    # AdapterHub's default init ("bert": both projections N(0, 0.02)) starts near the identity, not at it;
    # "mam_adapter" (up projection zero, the parallel adapter's default) starts at it
    Row("houlsby", lambda: dt.DoubleSeqBnConfig(reduction_factor=4, init_weights="mam_adapter"), _bottleneck(2, 4),
        identity=True, fp32_over_half=False),
    Row("pfeiffer", lambda: dt.SeqBnConfig(reduction_factor=4, init_weights="mam_adapter"), _bottleneck(1, 4),
        identity=True, fp32_over_half=False),
    Row("parallel", lambda: dt.ParBnConfig(reduction_factor=4), _bottleneck(1, 4), identity=True,
        fp32_over_half=False),
    Row("prompt-tuning", lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        _prompt_table, identity=False),
    Row("p-tuning-mlp", lambda: dt.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                       encoder_hidden_size=E), _prompt_mlp, identity=False),
    Row("prefix-projection", lambda: dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                           prefix_projection=True, encoder_hidden_size=E),
        _prefix_projected, identity=False),
    Row("p-tuning-v2", lambda: dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N), _prefix_deep,
        identity=False),
]
CASES = [pytest.param(row, arch, dtype, id=f"{row.name}-{arch}-{str(dtype)[6:]}")
         for row in ROWS for arch in MODELS for dtype in DTYPES]
IDENTITY_CASES = [case for case in CASES if case.values[0].identity]
"""Prompt-space methods prepend trained tokens: they change the output from the start."""


def _base(arch: str, dtype: torch.dtype) -> nn.Module:
    return MODELS[arch]().to(dtype)


def _adapted(row: Row, arch: str, dtype: torch.dtype, perturb: bool = True) -> nn.Module:
    model = dt.attach(_base(arch, dtype), row.make())
    if perturb:
        perturb_trainable(model, seed=5)
    return model


def _inputs() -> dict[str, Tensor]:
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _logits(model: nn.Module) -> Tensor:
    return model(**_inputs()).logits.float()


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("row", "arch", "dtype"), IDENTITY_CASES)
def test_identity_init_where_promised(row: Row, arch: str, dtype: torch.dtype) -> None:
    base = _logits(_base(arch, dtype))
    assert torch.equal(_logits(_adapted(row, arch, dtype, perturb=False)), base)


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_save_load_gives_the_same_outputs(row: Row, arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = _adapted(row, arch, dtype)
    dt.save(model, tmp_path)
    fresh = dt.load(_base(arch, dtype), tmp_path)
    assert torch.equal(_logits(fresh), _logits(model))


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_disabled_gives_the_base_exactly(row: Row, arch: str, dtype: torch.dtype) -> None:
    model = _adapted(row, arch, dtype)
    adapted = _logits(model)
    with dt.disabled(model):
        assert torch.equal(_logits(model), _logits(_base(arch, dtype)))
    assert torch.equal(_logits(model), adapted)


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_trainable_count_is_the_formula_and_the_dtype_the_method_keeps(row: Row, arch: str, dtype: torch.dtype) -> None:
    model = _adapted(row, arch, dtype, perturb=False)
    config = state_of(model).configs["default"]
    trained = _adapter_parameters(model)
    assert sum(p.numel() for p in trained.values()) == row.count(model, config) == dt.trainable_parameters(model)[0]
    assert {p.dtype for p in trained.values()} == {torch.float32 if row.fp32_over_half else dtype}


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_backward_reaches_the_adapter_only(row: Row, arch: str, dtype: torch.dtype) -> None:
    model = _adapted(row, arch, dtype).train()
    inputs = _inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trained = _adapter_parameters(model)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained.values())
    assert all(p.grad is None for k, p in model.named_parameters() if k not in trained)


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_refused_merge_and_bad_file_change_nothing(row: Row, arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = _adapted(row, arch, dtype)
    dt.save(model, tmp_path / "good")
    before = state_hash(model)
    with pytest.raises(dt.AdapterError):
        dt.merge(model)
    with pytest.raises(dt.AdapterError):
        dt.unload(model, merge=True)
    bad = _with_a_wrong_shape(tmp_path / "good", tmp_path / "bad")
    with pytest.raises(dt.AdapterFileError, match="shape"):
        dt.load(model, bad, name="other")
    assert state_hash(model) == before and dt.adapter_names(model) == ["default"]


def _with_a_wrong_shape(good: Path, bad: Path) -> Path:
    """A copy of an adapter folder with one tensor cut by a row."""
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, bad / "adapter_model.safetensors")
    json.loads((bad / "adapter_config.json").read_text())  # the config itself stays valid
    return bad


@pytest.mark.parametrize("row", [r for r in ROWS if not r.identity], ids=repr)
def test_accelerated_causal_lm_trains_the_prompt_methods_to_the_same_loss(row: Row) -> None:
    """``dt.accelerate`` (fused loss, RMSNorm kernel) works under the prompt methods' hooks: the same
    loss and the same adapter gradients as the plain model."""
    plain = _adapted(row, "llama", torch.float32).train()
    fast = dt.accelerate(_adapted(row, "llama", torch.float32).train())
    inputs = _inputs()
    losses = [m(**inputs, labels=inputs["input_ids"]).loss for m in (plain, fast)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) <= 1e-5
    grads = [{k: p.grad for k, p in _adapter_parameters(m).items()} for m in (plain, fast)]
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4) for k in grads[0])
