"""The invariant battery for methods that act on a whole model rather than one layer: bottleneck
adapters (module-output sites), the prompt-space methods (input and key/value sites), the
mixtures (Poly's task-routed skills, MixLoRA's token-routed experts, X-LoRA's classifier over a
first pass) and the rows that need a real model around a layer method: LoRA on the fused 3-D
expert weights of mixture-of-experts models (``target_parameters``) and QA-LoRA on an
``int4_group`` base (its lossless 4-bit merge).

The layer battery (test_invariants.py, battery_cases.py) runs every weight-space method on one
layer of every base kind; these methods need a transformer around them, so their rows run on tiny
GPT-2, LLaMA and mixture-of-experts models (Mixtral, Qwen2-MoE, OLMoE) in fp32 and bf16. The same
promises are checked: the identity init where the method promises one, save -> load into a fresh
base gives the same outputs, ``dt.disabled`` gives the base exactly, the trainable count equals the
method's formula (in the dtype the method keeps over a half-precision base), gradients reach the
adapter and nothing else, merging is refused where there is no weight to fold into (``Row.merge``;
else merged == unmerged and unmerge restores the weights, or on a 4-bit base the requantized merge
keeps every code), and a failed load, merge or attach (a taken name, a refused setting:
``Row.refused``) leaves the model bit for bit as it was.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import deltatune as dt
from battery_cases import restore_bound
from deltatune.state import state_of
from conftest import _quiet, close, state_hash, token_ids
from prompt_models import gpt2, llama, perturb_trainable


def _moe(arch: str) -> Callable[[], nn.Module]:
    """A tiny mixture-of-experts causal LM whose experts are fused 3-D parameters (transformers 5):
    2 blocks, hidden 16, 4 experts, top 2 (test_lora_moe.py's, at the battery's vocabulary; Qwen2-MoE's
    expert width 16, as its bf16 grouped matmul needs rows of a multiple of 16 bytes)."""
    def build() -> nn.Module:
        import transformers

        _quiet()
        small: dict[str, Any] = dict(vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, num_experts_per_tok=2, max_position_embeddings=32)
        configs: dict[str, Callable[[], Any]] = {
            "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **small),
            "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
                intermediate_size=24, moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=20,
                **small),
            "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=24, num_experts=4, **small),
        }
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(configs[arch]()).eval()
    return build


MODELS: dict[str, Callable[[], nn.Module]] = {"gpt2": gpt2, "llama": llama, "mixtral": _moe("mixtral"),
                                              "qwen2_moe": _moe("qwen2_moe"), "olmoe": _moe("olmoe")}
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


LINEAR_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
EMBEDDINGS = {"gpt2": ["wte"], "llama": ["embed_tokens"]}
"""The layers the linear-layer rows adapt: GPT-2's fused attention input (a Conv1D), LLaMA's query
and value projections (grouped-query: the value projection is narrower)."""


def _linears(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every layer LINEAR_TARGETS names: c_attn h -> 3h; q_proj h -> h, v_proj h -> kv width."""
    h = _width(model)
    per_block = [(h, 3 * h)] if model.config.model_type == "gpt2" else [(h, h), (h, _kv_width(model))]
    return per_block * _sites(model)


def _poly(model: nn.Module, config: Any) -> int:
    """Per layer: each skill's LoRA pair, ``n_skills r (in + out)``, and the router's logits per task and split."""
    skills = config.n_skills
    return sum(skills * config.r * (i + o) + config.n_tasks * config.n_splits * skills for i, o in _linears(model))


def _mixlora(model: nn.Module, config: Any) -> int:
    """Per layer: the router ``E x in`` and E LoRA experts ``r (in + out)``."""
    experts = config.num_experts
    return sum(experts * i + experts * config.r * (i + o) for i, o in _linears(model))


def _qalora(model: nn.Module, config: Any) -> int:
    """Per layer: ``A: (r, in / G)`` over the pooled input, ``B: (out, r)``."""
    return sum(config.r * (i // config.qalora_group_size + o) for i, o in _linears(model))


def _expert_stacks(model: nn.Module, config: Any) -> int:
    """Per block and expert: ``r (h + 2 I)`` on gate_up_proj ``(2 I, h)`` and ``r (I + h)`` on down_proj ``(h, I)``."""
    c = model.config
    experts = getattr(c, "num_local_experts", None) or c.num_experts
    inner = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    h = _width(model)
    return _sites(model) * experts * config.r * ((h + 2 * inner) + (inner + h))


XLORA_EXPERTS = (["q_proj", "v_proj"], ["q_proj", "o_proj"])
"""The LoRA experts X-LoRA mixes (ranks 2 and 3): they adapt q_proj, v_proj and o_proj in every block."""


def _xlora(model: nn.Module, config: Any) -> int:
    """The classifier (depth 1, layer-wise): ``hidden -> experts x adapted layers``, with its bias."""
    layers = _sites(model) * len({t for targets in XLORA_EXPERTS for t in targets})
    outputs = len(config.adapters) * layers
    return _width(model) * outputs + outputs


@functools.cache
def _xlora_folders() -> dict[str, str]:
    """The experts, trained (random, non-zero B) on the tiny LLaMA and saved once per session."""
    root = Path(tempfile.mkdtemp(prefix="xlora-experts-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folders = {}
    for i, targets in enumerate(XLORA_EXPERTS):
        torch.manual_seed(10 + i)
        expert = dt.attach(llama(), dt.LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets,
                                                  init_lora_weights=False))
        dt.save(expert, root / str(i))
        folders[str(i)] = str(root / str(i))
    return folders


GROUP = 16
"""The int4_group base's group size and QA-LoRA's (its merge folds into the groups' offsets)."""


def _int4_group(dtype: torch.dtype) -> dt.QuantConfig:
    return dt.QuantConfig(quant_type="int4_group", group_size=GROUP, compute_dtype=dtype)


@dataclass(frozen=True)
class Row:
    """One model-level method setting: its config (per architecture), its parameter formula, whether
    it starts as the identity, and the capabilities that decide which checks apply."""

    name: str
    make: Callable[[str], dt.DeltaConfig]
    count: Callable[[nn.Module, Any], int]
    identity: bool
    fp32_over_half: bool = True
    """Trained in fp32 over a half-precision base (peft's rule, bottleneck adapters included); False: in the
    base's dtype."""
    site: str = "module"
    """Where the change lives: "module" (a module's output), "prompt" (trained tokens or keys and
    values), "layer" (a linear layer's output), "parameter" (an expert stack), "model" (hooks on
    the model's call: X-LoRA's scaling pass)."""
    archs: tuple[str, ...] = ("gpt2", "llama")
    """The tiny models the row runs on (MODELS)."""
    quant: Callable[[torch.dtype], dt.QuantConfig] | None = None
    """How the base is quantized before the adapter is attached (None: a dense base)."""
    merge: str = "refused"
    """"refused": the change depends on the input, a task or the hidden states, so there is no weight
    to fold it into; "in_place": it merges into the dense weights and unmerges; "requantized": the
    base is 4-bit, so an in-place merge is refused and ``unload(merge=True, requantize=True)`` folds
    the change into the quantized weights without changing a code."""
    call: Callable[[nn.Module], ContextManager[Any]] | None = None
    """What every call of the adapted model runs inside (Poly: the rows' task ids)."""
    refused: tuple[tuple[str, Callable[[str], dt.DeltaConfig]], ...] = ()
    """Settings the method refuses, by name (per architecture): a ConfigError when the config is
    built or a TargetError when it is attached, the base left bit for bit as it was."""
    loads_trainable: bool = True
    """The file holds the trained tensors, so it loads trainable; False: it holds what a trained
    encoder computed (peft's format for the reparameterised prompt methods), and a trainable load
    is refused."""

    def __repr__(self) -> str:
        return self.name


ROWS = [
    # AdapterHub's default init ("bert": both projections N(0, 0.02)) starts near the identity, not at it;
    # "mam_adapter" (up projection zero, the parallel adapter's default) starts at it
    Row("houlsby", lambda arch: dt.DoubleSeqBnConfig(reduction_factor=4, init_weights="mam_adapter"),
        _bottleneck(2, 4), identity=True),
    Row("pfeiffer", lambda arch: dt.SeqBnConfig(reduction_factor=4, init_weights="mam_adapter"), _bottleneck(1, 4),
        identity=True),
    Row("parallel", lambda arch: dt.ParBnConfig(reduction_factor=4), _bottleneck(1, 4), identity=True),
    Row("prompt-tuning", lambda arch: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        _prompt_table, identity=False, site="prompt"),
    Row("p-tuning-mlp", lambda arch: dt.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                            encoder_hidden_size=E), _prompt_mlp, identity=False,
        site="prompt", loads_trainable=False),
    Row("prefix-projection", lambda arch: dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                                prefix_projection=True, encoder_hidden_size=E),
        _prefix_projected, identity=False, site="prompt", loads_trainable=False),
    Row("p-tuning-v2", lambda arch: dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        _prefix_deep, identity=False, site="prompt"),
    # Poly (B zero): the identity; two rows of tasks 2 and 0 of 3, two splits (multi-head routing)
    Row("poly", lambda arch: dt.PolyConfig(r=2, n_tasks=3, n_skills=2, n_splits=2, target_modules=LINEAR_TARGETS[arch]),
        _poly, identity=True, site="layer", call=lambda model: dt.poly_tasks(model, [2, 0]),
        refused=(("an_embedding", lambda arch: dt.PolyConfig(target_modules=EMBEDDINGS[arch])),
                 ("uneven_splits", lambda arch: dt.PolyConfig(n_splits=3, target_modules=LINEAR_TARGETS[arch])))),
    # MixLoRA (every B_e zero): the identity; 3 experts, top 2
    Row("mixlora", lambda arch: dt.MixLoraConfig(r=2, lora_alpha=4, num_experts=3, top_k=2,
                                                 target_modules=LINEAR_TARGETS[arch]), _mixlora, identity=True,
        site="layer",
        refused=(("an_embedding", lambda arch: dt.MixLoraConfig(target_modules=EMBEDDINGS[arch])),
                 ("top_k_above_experts", lambda arch: dt.MixLoraConfig(num_experts=2, top_k=3,
                                                                      target_modules=LINEAR_TARGETS[arch])))),
    # X-LoRA mixes trained experts from the first call: no identity. LLaMA only: its experts must be
    # LoRAs of linear layers (nn.Linear, (out, in)), as in peft; GPT-2's are Conv1D
    Row("xlora", lambda arch: dt.XLoraConfig(hidden_size=32, adapters=_xlora_folders(), xlora_size=8,
                                             layerwise_scalings=True), _xlora, identity=False, site="model",
        archs=("llama",),
        refused=(("another_hidden_size", lambda arch: dt.XLoraConfig(hidden_size=16, adapters=_xlora_folders())),
                 ("top_k_above_experts", lambda arch: dt.XLoraConfig(hidden_size=32, adapters=_xlora_folders(),
                                                                     top_k_lora=3)))),
    # LoRA on the experts' fused weights (B zero): the identity; merges into the 3-D parameters
    Row("lora-experts", lambda arch: dt.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                   target_parameters=["mlp.experts.gate_up_proj",
                                                                      "mlp.experts.down_proj"]),
        _expert_stacks, identity=True, site="parameter", archs=("mixtral", "qwen2_moe", "olmoe"), merge="in_place",
        refused=(("a_1d_parameter", lambda arch: dt.LoraConfig(target_modules=[],
                                                               target_parameters=["input_layernorm.weight"])),
                 ("qalora", lambda arch: dt.LoraConfig(target_modules=[], target_parameters=["mlp.experts.down_proj"],
                                                       use_qalora=True, qalora_group_size=4)))),
    # QA-LoRA on an int4_group base of the same group size (B zero): the identity; LLaMA's linear layers
    Row("qalora-int4", lambda arch: dt.LoraConfig(r=2, lora_alpha=4, target_modules=LINEAR_TARGETS[arch],
                                                  use_qalora=True, qalora_group_size=GROUP),
        _qalora, identity=True, site="layer", archs=("llama",), quant=_int4_group, merge="requantized",
        refused=(("uneven_groups", lambda arch: dt.LoraConfig(target_modules=LINEAR_TARGETS[arch], use_qalora=True,
                                                              qalora_group_size=24)),)),
]
CASES = [pytest.param(row, arch, dtype, id=f"{row.name}-{arch}-{str(dtype)[6:]}")
         for row in ROWS for arch in row.archs for dtype in DTYPES]
IDENTITY_CASES = [case for case in CASES if case.values[0].identity]
"""Prompt-space methods prepend trained tokens and X-LoRA mixes trained experts: they change the
output from the start."""
MERGE_CASES = [case for case in CASES if case.values[0].merge == "in_place"]
REQUANTIZED_CASES = [case for case in CASES if case.values[0].merge == "requantized"]
REFUSED_CASES = [pytest.param(row, arch, name, id=f"{row.name}-{arch}-{name}")
                 for row in ROWS for arch in row.archs for name, _ in row.refused]


def _base(arch: str, dtype: torch.dtype, row: Row | None = None) -> nn.Module:
    model = MODELS[arch]().to(dtype)
    return model if row is None or row.quant is None else dt.quantize(model, row.quant(dtype))


def _adapted(row: Row, arch: str, dtype: torch.dtype, perturb: bool = True) -> nn.Module:
    model = dt.attach(_base(arch, dtype, row), row.make(arch))
    if perturb:
        perturb_trainable(model, seed=5)
    return model


def _calling(row: Row, model: nn.Module) -> ContextManager[Any]:
    return row.call(model) if row.call is not None else contextlib.nullcontext()


def _inputs() -> dict[str, Tensor]:
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _logits(model: nn.Module, row: Row | None = None) -> Tensor:
    """The logits of the batch; ``row``: the adapted model's call, inside ``Row.call``."""
    with contextlib.nullcontext() if row is None else _calling(row, model):
        return model(**_inputs()).logits.float()


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("row", "arch", "dtype"), IDENTITY_CASES)
def test_identity_init_where_promised(row: Row, arch: str, dtype: torch.dtype) -> None:
    base = _logits(_base(arch, dtype, row))
    assert torch.equal(_logits(_adapted(row, arch, dtype, perturb=False), row), base)


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_save_load_gives_the_same_outputs(row: Row, arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = _adapted(row, arch, dtype)
    dt.save(model, tmp_path)
    fresh = dt.load(_base(arch, dtype, row), tmp_path)
    assert torch.equal(_logits(fresh, row), _logits(model, row))
    assert not torch.equal(_logits(model, row), _logits(_base(arch, dtype, row))), "the adapter must change the output"
    assert not _adapter_parameters(fresh), "dt.load freezes the adapter by default"
    if not row.loads_trainable:
        with pytest.raises(dt.AdapterFileError, match="trainable=False"):
            dt.load(_base(arch, dtype, row), tmp_path, trainable=True)
        return
    trainable = dt.load(_base(arch, dtype, row), tmp_path, trainable=True)
    config = state_of(trainable).configs["default"]
    assert dt.trainable_parameters(trainable)[0] == row.count(trainable, config)


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_disabled_gives_the_base_exactly(row: Row, arch: str, dtype: torch.dtype) -> None:
    model = _adapted(row, arch, dtype)
    adapted = _logits(model, row)
    with dt.disabled(model):
        assert torch.equal(_logits(model, row), _logits(_base(arch, dtype, row)))
    assert torch.equal(_logits(model, row), adapted)
    with pytest.raises(RuntimeError, match="inside"), dt.disabled(model):
        raise RuntimeError("inside")
    assert torch.equal(_logits(model, row), adapted), "the adapter comes back after an exception in the block"


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
    with _calling(row, model):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trained = _adapter_parameters(model)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained.values())
    assert all(p.grad is None for k, p in model.named_parameters() if k not in trained)


@pytest.mark.parametrize(("row", "arch", "dtype"), CASES)
def test_refused_merge_bad_file_and_taken_name_change_nothing(row: Row, arch: str, dtype: torch.dtype,
                                                              tmp_path: Path) -> None:
    model = _adapted(row, arch, dtype)
    dt.save(model, tmp_path / "good")
    before, out = state_hash(model), _logits(model, row)
    if row.merge == "refused":
        with pytest.raises(dt.AdapterError):
            dt.merge(model)
        with pytest.raises(dt.AdapterError):
            dt.unload(model, merge=True)
    elif row.merge == "requantized":  # a 4-bit weight cannot hold a merged dense weight in place
        with pytest.raises(dt.QuantError):
            dt.merge(model)
    bad = _with_a_wrong_shape(tmp_path / "good", tmp_path / "bad")
    with pytest.raises(dt.AdapterFileError, match="shape"):
        dt.load(model, bad, name="other")
    with pytest.raises(dt.AdapterError):  # the name is taken
        dt.attach(model, row.make(arch), name="default")
    assert state_hash(model) == before and dt.adapter_names(model) == ["default"]
    assert torch.equal(_logits(model, row), out)
    fresh = _base(arch, dtype, row)
    fresh_before = state_hash(fresh)
    with pytest.raises(dt.AdapterFileError, match="shape"):
        dt.load(fresh, bad)
    assert state_hash(fresh) == fresh_before and "deltatune_state" not in fresh.__dict__


@pytest.mark.parametrize(("row", "arch", "setting"), REFUSED_CASES)
def test_refused_setting_leaves_the_base_unchanged(row: Row, arch: str, setting: str) -> None:
    model = _base(arch, torch.float32, row)
    before = state_hash(model)
    with pytest.raises((dt.ConfigError, dt.TargetError)):
        dt.attach(model, dict(row.refused)[setting](arch))
    assert state_hash(model) == before and "deltatune_state" not in model.__dict__


def _with_a_wrong_shape(good: Path, bad: Path) -> Path:
    """A copy of an adapter folder (what it keeps inside it too, e.g. X-LoRA's experts) with one tensor cut by a row."""
    shutil.copytree(good, bad)
    tensors = load_file(good / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, bad / "adapter_model.safetensors")
    json.loads((bad / "adapter_config.json").read_text())  # the config itself stays valid
    return bad


def _base_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of the model that is not an adapter's, cloned (the wrappers' keys stay put while merging)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." not in k}


@pytest.mark.parametrize(("row", "arch", "dtype"), MERGE_CASES)
def test_merge_equals_unmerged_and_unmerge_restores(row: Row, arch: str, dtype: torch.dtype) -> None:
    model = _adapted(row, arch, dtype)
    twin = copy.deepcopy(model)
    adapted, original = _logits(model, row), _base_tensors(model)
    dt.merge(model)
    merged = _base_tensors(model)
    assert close(_logits(model, row), adapted, dtype), "merged vs unmerged output"
    changed = [k for k in original if not torch.equal(merged[k], original[k])]
    assert changed, "merging should change the weights"
    dt.merge(model)  # merging twice is a no-op
    assert all(torch.equal(v, merged[k]) for k, v in _base_tensors(model).items())
    dt.unmerge(model)
    restored = _base_tensors(model)
    for key in original:
        if key in changed:  # a change added to W: gain 1 (battery_cases.restore_bound)
            bound = restore_bound(original[key].double(), merged[key].double(), 1.0, dtype)
            assert ((restored[key].double() - original[key].double()).abs() <= bound).all(), key
        else:
            assert torch.equal(restored[key], original[key]), key
    # unmerged, the model computes what the never-merged copy computes on the restored weights (not
    # "close to before": a bf16 rounding of an expert's weight may move a token to another expert)
    twin.load_state_dict(restored, strict=False)
    assert torch.equal(_logits(model, row), _logits(twin, row))


@pytest.mark.parametrize(("row", "arch", "dtype"), REQUANTIZED_CASES)
def test_requantized_merge_keeps_every_code(row: Row, arch: str, dtype: torch.dtype) -> None:
    """On a 4-bit base whose groups the change is constant over, ``unload(merge=True, requantize=True)``
    folds it into the quantization constants: no code changes, no warning of a lossy re-quantization,
    and the 4-bit model computes what the adapted one did."""
    model = _adapted(row, arch, dtype)
    adapted = _logits(model, row)
    codes = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    assert codes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = dt.unload(model, merge=True, requantize=True)
    assert not [w for w in caught if "quantiz" in str(w.message)], [str(w.message) for w in caught]
    after = {k: v for k, v in plain.state_dict().items() if v.dtype == torch.uint8}
    assert after.keys() == codes.keys() and all(torch.equal(after[k], codes[k]) for k in codes)
    assert close(_logits(plain), adapted, dtype), "requantized merged vs adapted output"


@pytest.mark.parametrize("row", [r for r in ROWS if r.site == "prompt"], ids=repr)
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
