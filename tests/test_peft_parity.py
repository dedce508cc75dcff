"""Exact interchange with the real ``peft`` package, both directions.

(a) peft -> deltatune: ``peft.get_peft_model`` on a copy of a base, non-zero random adapter
weights (and saved module copies and trained biases), ``save_pretrained``; ``dt.load`` into a
fresh base must give peft's logits within 1e-5 (fp32).
(b) deltatune -> peft: ``dt.attach`` with random weights, ``dt.save``; ``PeftModel.from_pretrained``
on a fresh base must give deltatune's outputs within 1e-5.

Also: the adapter_config.json deltatune writes has exactly peft's keys (but ``peft_version``)
and the same values where they matter, the safetensors files hold the same keys and shapes,
several adapters move both ways, and the peft -> deltatune direction holds in bf16.
peft is only ever imported here, as a test oracle.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import TOLERANCES, conv_net, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_t5, token_ids

import peft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

Factory = Callable[[], nn.Module]
Saved = Callable[["Case", str], tuple[Path, Tensor]]
FP32_ATOL = TOLERANCES[torch.float32]["atol"]
CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "bias", "use_rslora", "rank_pattern",
                 "alpha_pattern", "modules_to_save", "fan_in_fan_out", "task_type", "exclude_modules",
                 "layers_to_transform", "layers_pattern")


def peft_extra(key: str) -> bool:
    """Keys peft writes that carry no adapter state: the duplicate biases of bias="all" +
    modules_to_save, and the full base weight of a targeted embed_tokens / lm_head."""
    parts = key.split(".")
    return any(p in ("original_module", "modules_to_save") for p in parts[:-1]) or key.endswith(".base_layer.weight")


@dataclass(frozen=True)
class Case:
    """One adapter setting on one tiny base; ``config`` holds kwargs valid for both LoraConfig classes."""

    id: str
    factory: Factory
    config: dict[str, Any]
    save: dict[str, Any] = field(default_factory=dict)
    """Extra ``peft save_pretrained`` kwargs."""


EMBED_TARGETS = {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}

CASES = [
    Case("llama-plain", tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    Case("llama-rslora", tiny_llama, {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "lora_alpha": 16}),
    Case("gpt2-bias-all", tiny_gpt2, {"target_modules": ["c_attn"], "bias": "all"}),
    Case("gpt2-bias-lora_only", tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "bias": "lora_only"}),
    Case("bert-bias-lora_only", tiny_bert, {"target_modules": ["query", "value"], "bias": "lora_only"}),
    Case("llama-rank-alpha-pattern", tiny_llama, {
        "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"^model.layers.0.*v_proj": 16}}),
    Case("gpt2-rank-alpha-pattern", tiny_gpt2, {
        "target_modules": ["c_attn", "c_proj"], "rank_pattern": {"h.0.attn.c_attn": 2, "mlp.c_proj": 6},
        "alpha_pattern": {r"^transformer\.h\.1\..*": 3}}),
    Case("llama-modules-to-save", tiny_llama, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    Case("gpt2-modules-to-save-bias-all", tiny_gpt2,
         {"target_modules": ["c_attn"], "modules_to_save": ["ln_f"], "bias": "all"}),
    Case("gpt2-tied-lm-head-to-save", tiny_gpt2, {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}),
    Case("bert-classifier-to-save", tiny_bert, {"target_modules": ["query"], "modules_to_save": ["classifier"]}),
    Case("bert-seq-cls", tiny_bert, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    Case("bert-seq-cls-bias-all", tiny_bert,
         {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "bias": "all"}),
    Case("bert-seq-cls-modules-to-save", tiny_bert,
         {"target_modules": ["query"], "task_type": "SEQ_CLS", "modules_to_save": ["pooler"]}),
    Case("llama-all-linear", tiny_llama, {"target_modules": "all-linear"}),
    Case("t5-all-linear-dropout", tiny_t5, {"target_modules": "all-linear", "lora_dropout": 0.1}),
    Case("t5-qv-bias-all", tiny_t5, {"target_modules": ["q", "v"], "bias": "all", "use_rslora": True}),
    Case("opt-all-linear-gaussian", tiny_opt, {"target_modules": "all-linear", "init_lora_weights": "gaussian",
                                               "alpha_pattern": {"fc1": 3}}),
    Case("gpt2-all-linear", tiny_gpt2, {"target_modules": "all-linear"}),
    Case("bert-all-linear-seq-cls", tiny_bert, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    Case("llama-regex", tiny_llama, {"target_modules": r".*layers\.1\.self_attn\.(q|k)_proj|.*mlp\.up_proj"}),
    Case("gpt2-regex", tiny_gpt2, {"target_modules": r"transformer\.h\.\d\.(attn\.c_attn|mlp\.c_fc)"}),
    Case("llama-layers-to-transform", tiny_llama,
         {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    Case("gpt2-layers-to-transform", tiny_gpt2,
         {"target_modules": ["c_attn", "c_proj"], "layers_to_transform": 0, "layers_pattern": "h"}),
    Case("bert-layers-to-transform", tiny_bert,
         {"target_modules": ["query", "value"], "layers_to_transform": [1], "layers_pattern": ["layer"]}),
    Case("llama-exclude-list", tiny_llama,
         {"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": ["layers.0.self_attn.k_proj"]}),
    Case("llama-exclude-regex", tiny_llama, {"target_modules": "all-linear", "exclude_modules": r".*mlp\..*"}),
    Case("llama-embedding", tiny_llama, EMBED_TARGETS, save={"save_embedding_layers": False}),
    Case("llama-embedding-default-save", tiny_llama, EMBED_TARGETS),
    Case("gpt2-embedding", tiny_gpt2, {"target_modules": ["wte", "c_attn"]}),
    Case("convnet", conv_net, {"target_modules": ["conv1", "conv2", "pointwise", "embed", "head"]}),
    Case("convnet-patterns-bias", conv_net, {
        "target_modules": ["conv1", "conv2", "embed"], "rank_pattern": {"conv2": 2}, "alpha_pattern": {"embed": 3},
        "bias": "lora_only"}),
]


def case_params(cases: list[Case]) -> list[Any]:
    """One ``pytest.param`` per case, named by its id."""
    return [pytest.param(c, id=c.id) for c in cases]


def inputs_for(factory: Factory) -> Tensor:
    if factory is not conv_net:
        return token_ids()
    ids = token_ids(vocab=20)
    ids[:, 0] = 0  # the embedding's padding_idx
    return ids


def output(model: nn.Module, x: Tensor) -> Tensor:
    seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    with torch.no_grad():
        out = model(x, decoder_input_ids=x[:, :5]) if seq2seq else model(x)
    return getattr(out, "logits", out).float()


def perturb(model: nn.Module, select: Callable[[str, nn.Parameter], bool] | None = None, seed: int = 0) -> None:
    """Add seeded noise to the selected parameters (default: the trainable ones) so nothing is zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (select or (lambda n, p: p.requires_grad))(name, param):
                param.add_(0.2 * torch.randn(param.shape, generator=generator).to(param))


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def peft_config(config: dict[str, Any]) -> Any:
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **copy.deepcopy(config)})


def dt_config(config: dict[str, Any]) -> dt.LoraConfig:
    return dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **copy.deepcopy(config)})


def peft_roundtrip(base: nn.Module, case: Case, folder: Path) -> Tensor:
    """peft side of (a): adapt a copy of ``base`` with random weights, save to ``folder``; its output."""
    model = peft.get_peft_model(copy.deepcopy(base), peft_config(case.config))
    perturb(model)
    model.eval()
    model.save_pretrained(folder, **case.save)
    return output(model, inputs_for(case.factory))


def dt_roundtrip(base: nn.Module, case: Case, folder: Path) -> Tensor:
    """deltatune side of (b): attach to a copy of ``base`` with random weights, save to ``folder``; its output."""
    model = dt.attach(copy.deepcopy(base), dt_config(case.config))
    perturb(model)
    model.eval()
    dt.save(model, folder)
    return output(model, inputs_for(case.factory))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """``saved(case, "peft" | "dt")``: the folder that side wrote for ``case`` and its output, made once."""
    cache: dict[tuple[str, str], tuple[Path, Tensor]] = {}

    def get(case: Case, side: str) -> tuple[Path, Tensor]:
        if (case.id, side) not in cache:
            folder = tmp_path_factory.mktemp(f"{side}-{case.id}")
            roundtrip = peft_roundtrip if side == "peft" else dt_roundtrip
            cache[case.id, side] = folder, roundtrip(case.factory(), case, folder)
        return cache[case.id, side]

    return get


def assert_parity(got: Tensor, want: Tensor, base_out: Tensor, atol: float = FP32_ATOL) -> None:
    assert max_diff(base_out, want) > 1e-3, "the adapter does not change the output: the test would prove nothing"
    assert max_diff(got, want) <= atol, f"max abs diff {max_diff(got, want):.3g} > {atol}"


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape in a folder's adapter_model.safetensors, peft's extra keys left out."""
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items() if not peft_extra(k)}


def config_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


def comparable(value: Any) -> Any:
    """Lists compare as sets (peft writes target sets in arbitrary order)."""
    return frozenset(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------- (a) and (b)


@pytest.mark.parametrize("case", case_params(CASES))
def test_peft_to_deltatune(case: Case, saved: Saved) -> None:
    folder, want = saved(case, "peft")
    base, x = case.factory(), inputs_for(case.factory)
    assert_parity(output(dt.load(copy.deepcopy(base), folder), x), want, output(base, x))


@pytest.mark.parametrize("case", case_params(CASES))
def test_deltatune_to_peft(case: Case, saved: Saved) -> None:
    folder, want = saved(case, "dt")
    base, x = case.factory(), inputs_for(case.factory)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert_parity(output(model, x), want, output(base, x))


# --------------------------------------------------------------------------- file layout


@pytest.mark.parametrize("case", case_params(CASES))
def test_config_json_matches_peft(case: Case, saved: Saved) -> None:
    ours, theirs = config_json(saved(case, "dt")[0]), config_json(saved(case, "peft")[0])
    assert set(ours) == set(theirs) - {"peft_version"}
    assert {f: comparable(ours[f]) for f in CONFIG_FIELDS} == {f: comparable(theirs[f]) for f in CONFIG_FIELDS}


@pytest.mark.parametrize("case", case_params(CASES))
def test_safetensors_layout_matches_peft(case: Case, saved: Saved, tmp_path: Path) -> None:
    """Same keys and shapes as peft, for peft's adapter re-saved by deltatune (values too) and a fresh one."""
    peft_folder, _ = saved(case, "peft")
    dt.save(dt.load(case.factory(), peft_folder), tmp_path)
    want = tensor_shapes(peft_folder)
    assert tensor_shapes(tmp_path) == want
    assert tensor_shapes(saved(case, "dt")[0]) == want
    resaved, original = (load_file(f / "adapter_model.safetensors") for f in (tmp_path, peft_folder))
    assert all(torch.equal(resaved[k], original[k]) for k in resaved)


# --------------------------------------------------------------------------- several adapters

MULTI = [
    pytest.param(tiny_llama, {"target_modules": ["q_proj", "v_proj"]},
                 {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj", "o_proj", "gate_proj"],
                  "modules_to_save": ["lm_head"]}, id="llama"),
    pytest.param(tiny_gpt2, {"target_modules": ["c_attn"], "modules_to_save": ["ln_f"]},
                 {"r": 6, "lora_alpha": 3, "target_modules": ["c_fc", "wte"], "use_rslora": True}, id="gpt2"),
]


@pytest.mark.parametrize(("factory", "first", "second"), MULTI)
def test_two_peft_adapters_load_into_deltatune(factory: Factory, first: dict[str, Any], second: dict[str, Any],
                                               tmp_path: Path) -> None:
    base, x = factory(), inputs_for(factory)
    model = peft.get_peft_model(copy.deepcopy(base), peft_config(first))
    model.add_adapter("other", peft_config(second))
    perturb(model, lambda n, p: "lora_" in n or ".modules_to_save." in n)
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    ours = dt.load(copy.deepcopy(base), tmp_path)
    dt.load(ours, tmp_path / "other", name="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        dt.set_active(ours, name)
        assert_parity(output(ours, x), output(model, x), output(base, x))


@pytest.mark.parametrize(("factory", "first", "second"), MULTI)
def test_two_deltatune_adapters_load_into_peft(factory: Factory, first: dict[str, Any], second: dict[str, Any],
                                               tmp_path: Path) -> None:
    base, x = factory(), inputs_for(factory)
    ours = dt.attach(copy.deepcopy(base), dt_config(first))
    dt.attach(ours, dt_config(second), name="other")
    perturb(ours)
    dt.save(ours, tmp_path)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model.load_adapter(tmp_path / "other", adapter_name="other")
    model.eval()
    for name in ("default", "other"):
        model.set_adapter(name)
        dt.set_active(ours, name)
        assert_parity(output(model, x), output(ours, x), output(base, x))


# --------------------------------------------------------------------------- bf16

BF16_CASES = [c for c in CASES if c.id in ("llama-plain", "gpt2-modules-to-save-bias-all", "gpt2-embedding")]


@pytest.mark.parametrize("case", case_params(BF16_CASES))
def test_peft_to_deltatune_bf16(case: Case, tmp_path: Path) -> None:
    base, x = case.factory().to(torch.bfloat16), inputs_for(case.factory)
    want = peft_roundtrip(base, case, tmp_path)
    got = output(dt.load(copy.deepcopy(base), tmp_path), x)
    assert max_diff(output(base, x), want) > 1e-1
    assert torch.allclose(got, want, **TOLERANCES[torch.bfloat16]), f"max abs diff {max_diff(got, want):.3g}"
