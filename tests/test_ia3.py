"""IA3: peft parity both ways, the init per base kind, and the config rules.

Parity: peft -> deltatune and deltatune -> peft on tiny LLaMA, GPT-2 (Conv1D), BERT (SEQ_CLS)
and the ConvNet (Conv2d + Linear), with perturbed ``ia3_l`` vectors, within 1e-5 in fp32; the
adapter_config.json key set and the safetensors keys and shapes equal peft's.
Per base kind (fp32 and bf16, output and feed-forward scaling): a fresh ``ia3_l`` is ones in
peft's shape. The invariant battery (identity, the dense fp64 oracle ``diag(l) W`` /
``W diag(l)``, merge / unmerge of weights and biases, save / load, disabled, the count ``out`` or
``in``, gradients, compositions) runs in test_invariants.py. peft is only imported here, as a
test oracle.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from battery_cases import DTYPES, KIND, METHOD, Kind, Method, adapted, delta_of
from conftest import (TOLERANCES, conv_net, outputs, perturb, state_hash, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5,
                      token_ids, train_command)
from deltatune.cli import main

import peft
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FP32_ATOL = TOLERANCES[torch.float32]["atol"]

# ------------------------------------------------------------------------------------ peft parity

PARITY = [
    pytest.param(tiny_llama, {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                 id="llama"),
    pytest.param(tiny_llama, {"target_modules": r".*\.(k_proj|v_proj|down_proj)", "feedforward_modules": r".*down_proj"},
                 id="llama-regex"),
    pytest.param(tiny_gpt2, {"target_modules": ["c_attn", "c_fc", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
                 id="gpt2"),
    pytest.param(tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"],
                             "modules_to_save": ["ln_f"]}, id="gpt2-ff-c_fc-to-save"),
    pytest.param(tiny_bert, {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"],
                             "task_type": "SEQ_CLS"}, id="bert-seq-cls"),
    pytest.param(conv_net, {"target_modules": ["conv2", "pointwise", "head"], "feedforward_modules": ["pointwise"]},
                 id="convnet"),
]


def inputs_for(factory: Callable[[], nn.Module]) -> Tensor:
    if factory is not conv_net:
        return token_ids()
    ids = token_ids(vocab=20)
    ids[:, 0] = 0
    return ids


def output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out).float()



def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_parity(got: Tensor, want: Tensor, base_out: Tensor) -> None:
    assert max_diff(base_out, want) > 1e-3, "the adapter does not change the output: the test would prove nothing"
    assert max_diff(got, want) <= FP32_ATOL, f"max abs diff {max_diff(got, want):.3g}"


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def config_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


def peft_saved(base: nn.Module, kwargs: dict[str, Any], folder: Path) -> nn.Module:
    """peft's IA3 adapter (``kwargs``) on a copy of ``base``, vectors perturbed, saved to ``folder``; in eval mode."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**copy.deepcopy(kwargs)))
    perturb(theirs)
    theirs.eval().save_pretrained(folder)
    return theirs


def dt_saved(base: nn.Module, kwargs: dict[str, Any], folder: Path) -> nn.Module:
    """deltatune's IA3 adapter (``kwargs``) on a copy of ``base``, perturbed apart from peft's, saved to ``folder``."""
    ours = dt.attach(copy.deepcopy(base), dt.IA3Config(**copy.deepcopy(kwargs)))
    perturb(ours, seed=1)
    dt.save(ours.eval(), folder)
    return ours


@pytest.mark.parametrize(("factory", "kwargs"), PARITY)
def test_peft_parity_both_ways(factory: Callable[[], nn.Module], kwargs: dict[str, Any], tmp_path: Path) -> None:
    base, x = factory(), inputs_for(factory)
    base_out = output(base, x)

    theirs = peft_saved(base, kwargs, tmp_path / "peft")
    want = output(theirs, x)
    loaded = dt.load(copy.deepcopy(base), tmp_path / "peft")
    assert_parity(output(loaded, x), want, base_out)
    dt.save(loaded, tmp_path / "resaved")
    resaved, original = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("resaved", "peft"))
    assert resaved.keys() == original.keys() and all(torch.equal(resaved[k], original[k]) for k in resaved)
    assert all(".ia3_l" in k or ".modules_to_save." in k or "classifier" in k or "ln_f" in k for k in original)

    mine = output(dt_saved(base, kwargs, tmp_path / "dt"), x)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dt").eval()
    assert_parity(output(back, x), mine, base_out)

    ours_json, peft_json = config_json(tmp_path / "dt"), config_json(tmp_path / "peft")
    assert set(ours_json) == set(peft_json) - {"peft_version"}
    for key in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "task_type", "modules_to_save", "exclude_modules"):
        assert ours_json[key] == peft_json[key], key
    for key in ("target_modules", "feedforward_modules"):
        as_set = (lambda v: frozenset(v) if isinstance(v, list) else v)
        assert as_set(ours_json[key]) == as_set(peft_json[key]), key
    assert shapes(tmp_path / "dt") == shapes(tmp_path / "peft")


@pytest.mark.parametrize(("factory", "task_type"), [(tiny_bert, "SEQ_CLS"), (tiny_llama, None), (tiny_gpt2, None),
                                                    (tiny_t5, None)], ids=["bert", "llama", "gpt2", "t5"])
def test_default_targets_equal_peft(factory: Callable[[], nn.Module], task_type: str | None, tmp_path: Path) -> None:
    """Without target_modules / feedforward_modules both libraries pick the same layers and scalings
    (equal tensor keys and shapes), write the same resolved lists, and read each other's file. (BERT's
    tiny logits move visibly only with its trained classifier: SEQ_CLS.)"""
    base, x = factory(), token_ids()
    base_out = outputs(base, x).float()
    theirs = peft_saved(base, {"task_type": task_type}, tmp_path / "peft")
    ours = dt_saved(base, {"task_type": task_type}, tmp_path / "dt")
    assert shapes(tmp_path / "dt") == shapes(tmp_path / "peft")
    ours_json, peft_json = config_json(tmp_path / "dt"), config_json(tmp_path / "peft")
    for key in ("target_modules", "feedforward_modules"):
        assert isinstance(ours_json[key], list) and set(ours_json[key]) == set(peft_json[key]), key
    assert_parity(outputs(dt.load(copy.deepcopy(base), tmp_path / "peft"), x).float(), outputs(theirs, x).float(),
                  base_out)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dt").eval()
    assert_parity(outputs(back, x).float(), outputs(ours, x).float(), base_out)


# Lists attach settles (all-linear expanded, a default feed-forward list beside chosen targets): peft
# scales by suffix with no subset rule then, and writes lists that fail its own rule on reload
# (peft 0.21.2); deltatune records nested equivalents, and reads peft's where that is exact.
# (kwargs, the feed-forward list deltatune records.)
LLAMA_DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
BERT_OUT = [f"bert.encoder.layer.{i}.{part}output.dense" for i in (0, 1) for part in ("attention.", "")]
SETTLED = [
    pytest.param(tiny_llama, {"target_modules": "all-linear"}, LLAMA_DOWN, id="llama-all-linear"),
    pytest.param(tiny_llama, {"target_modules": "ALL-LINEAR", "feedforward_modules": ["down_proj"]}, LLAMA_DOWN,
                 id="llama-all-linear-ff-list"),
    pytest.param(tiny_llama, {"target_modules": "all-linear", "feedforward_modules": r".*\.mlp\.down_proj"},
                 r".*\.mlp\.down_proj", id="llama-all-linear-ff-regex"),
    pytest.param(tiny_llama, {"target_modules": "all-linear", "feedforward_modules": ["w0"]}, [],
                 id="llama-all-linear-ff-unmatched"),
    pytest.param(tiny_gpt2, {"target_modules": "all-linear"},
                 ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"], id="gpt2-all-linear"),
    pytest.param(tiny_bert, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}, BERT_OUT,
                 id="bert-all-linear-seq-cls"),
    pytest.param(conv_net, {"target_modules": "all-linear", "feedforward_modules": []}, [], id="convnet-all-linear"),
    pytest.param(tiny_llama, {"target_modules": ["q_proj", "down_proj"]}, ["down_proj"], id="llama-q-down"),
    pytest.param(tiny_llama, {"target_modules": ["q_proj", "v_proj"]}, [], id="llama-q-v"),
    pytest.param(tiny_llama, {"target_modules": ["mlp.down_proj", "q_proj"]}, ["mlp.down_proj"], id="llama-mlp-down"),
    pytest.param(tiny_bert, {"target_modules": ["dense"], "task_type": "SEQ_CLS"}, BERT_OUT, id="bert-dense"),
]


@pytest.mark.parametrize(("factory", "kwargs", "recorded"), SETTLED)
def test_settled_targets_equal_peft(factory: Callable[[], nn.Module], kwargs: dict[str, Any], recorded: Any,
                                    tmp_path: Path) -> None:
    """peft and deltatune adapt the same layers with the same scaling axis (file keys and shapes); with
    peft's random vectors in deltatune's folder, deltatune and peft both reproduce peft's model; the
    recorded feed-forward list nests in the targets, so peft reads the folder. deltatune reads peft's
    folder (which peft refuses) to the same outputs, but for a target covering both kinds."""
    base, x = factory(), inputs_for(factory)
    base_out = output(base, x)
    theirs = peft_saved(base, kwargs, tmp_path / "peft")
    want = output(theirs, x)
    if kwargs["target_modules"] == ["dense"]:  # peft's file: output.dense may be only some of the dense layers
        with pytest.raises(dt.AdapterFileError, match=r"feedforward_modules=\('output.dense',\).*Fix"):
            dt.load(copy.deepcopy(base), tmp_path / "peft")
    else:
        assert_parity(output(dt.load(copy.deepcopy(base), tmp_path / "peft"), x), want, base_out)
    dt.save(dt.attach(copy.deepcopy(base), dt.IA3Config(**copy.deepcopy(kwargs))), tmp_path / "dt")
    assert shapes(tmp_path / "dt") == shapes(tmp_path / "peft")
    saved = config_json(tmp_path / "dt")
    assert saved["feedforward_modules"] == recorded
    assert isinstance(recorded, str) or set(recorded) <= set(saved["target_modules"])
    (tmp_path / "dt" / "adapter_model.safetensors").write_bytes((tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
    assert_parity(output(dt.load(copy.deepcopy(base), tmp_path / "dt"), x), want, base_out)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dt").eval()
    assert_parity(output(back, x), want, base_out)


def test_all_linear_without_a_feedforward_default_raises_as_peft() -> None:
    model = conv_net()
    before = state_hash(model)
    with pytest.raises(ValueError, match="feedforward_modules"):
        peft.get_peft_model(conv_net(), peft.IA3Config(target_modules="all-linear"))
    with pytest.raises(dt.TargetError, match=r"feedforward_modules=None .*model type None.*Fix: pass feedforward_modules"):
        dt.attach(model, dt.IA3Config(target_modules="all-linear"))
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")


@pytest.mark.parametrize("field", ["target_modules", "feedforward_modules"])
def test_no_default_for_the_architecture_raises_with_the_models_names(field: str) -> None:
    model = conv_net()
    before = state_hash(model)
    given = {"target_modules": ["head"], "feedforward_modules": []}
    with pytest.raises(dt.TargetError, match=rf"{field}=None .*model type None.*'head'"):
        dt.attach(model, dt.IA3Config(**{**given, field: None}))
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")


def test_train_command_uses_the_defaults(tiny_bert_dir: Path, sentiment_file: Path, tmp_path: Path,
                                         keep_thread_count: None) -> None:
    args = train_command(tiny_bert_dir, sentiment_file, tmp_path, options=("--max-steps", "1"))
    assert main([*args[:args.index("--target-modules")], "--method", "ia3", "--no-initial-eval"]) == 0
    saved = config_json(tmp_path / "adapter")
    assert saved["target_modules"] == ["key", "output.dense", "value"] and saved["feedforward_modules"] == ["output.dense"]


@pytest.mark.parametrize(("targets", "recorded"), [
    (("key", "value", "output.dense"), (["key", "output.dense", "value"], ["output.dense"])),
    (("key", "value", "output.dense", "--feedforward-modules"), (["key", "output.dense", "value"], [])),
    (("all-linear", "--feedforward-modules", "output.dense"), (None, BERT_OUT)),
], ids=["default-feedforward", "flag-alone-none", "all-linear"])
def test_train_command_feedforward_as_peft(targets: tuple[str, ...], recorded: tuple[Any, list[str]],
                                           tiny_bert_dir: Path, sentiment_file: Path, tmp_path: Path,
                                           keep_thread_count: None) -> None:
    """--target-modules without --feedforward-modules: the architecture's feed-forward list, as peft's
    None; the flag alone: none. The run file (None recorded) reads back."""
    from deltatune.train.options import split_options
    from deltatune.train.run import read_run_file

    args = train_command(tiny_bert_dir, sentiment_file, tmp_path, options=("--max-steps", "1"))
    assert main([*args[:args.index("--target-modules")], "--method", "ia3", "--no-initial-eval",
                 "--target-modules", *targets]) == 0
    saved = config_json(tmp_path / "adapter")
    assert recorded[0] is None or saved["target_modules"] == recorded[0]
    assert saved["feedforward_modules"] == recorded[1]
    run, _ = split_options(read_run_file(tmp_path)["options"])
    assert run.method_options["feedforward_modules"] == (None if "--feedforward-modules" not in targets else
                                                         tuple(targets[targets.index("--feedforward-modules") + 1:]))


@pytest.mark.parametrize(("targets", "given", "built"), [
    (("q_proj",), None, None), (("q_proj",), (), ()), (None, None, None), (None, (), None),
    (("q_proj", "down_proj"), ("down_proj",), ("down_proj",))])
def test_recipe_feedforward_option(targets: tuple[str, ...] | None, given: tuple[str, ...] | None,
                                   built: tuple[str, ...] | None) -> None:
    """Absent (None): the default at attach; empty beside targets: none; empty without targets (what run
    files from before None record for absent): the default, as then."""
    from deltatune.registry import RecipeInput, recipe_named

    run = RecipeInput({"feedforward_modules": given}, targets, None, {"task_type": None, "modules_to_save": None}, 1)
    assert recipe_named("ia3").build(run) == dt.IA3Config(target_modules=targets, feedforward_modules=built)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_peft_merge_matches(dtype: torch.dtype) -> None:
    """Merged weights and biases equal peft's merge_and_unload (bf16: both round once)."""
    base = tiny_gpt2().to(dtype)
    kwargs = {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    ours = dt.attach(copy.deepcopy(base), dt.IA3Config(**kwargs))
    perturb(theirs)
    with torch.no_grad():
        for (_, p), (_, q) in zip(sorted((n, p) for n, p in theirs.named_parameters() if p.requires_grad),
                                  sorted((n, p) for n, p in ours.named_parameters() if p.requires_grad)):
            q.copy_(p)
    merged = theirs.merge_and_unload().state_dict()
    mine = dt.unload(ours, merge=True).state_dict()
    assert merged.keys() == mine.keys()
    assert all(torch.equal(merged[k], mine[k]) for k in merged), [k for k in merged if not torch.equal(merged[k], mine[k])]


def test_peft_bf16_to_deltatune(tmp_path: Path) -> None:
    base, x = tiny_llama().to(torch.bfloat16), token_ids()
    kwargs = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    theirs = peft_saved(base, kwargs, tmp_path)
    ours = dt.load(copy.deepcopy(base), tmp_path)
    assert torch.equal(output(ours, x), output(theirs, x))


# -------------------------------------------------------------------- the vector's shape per kind
# The invariants (identity, fp64 oracle, merge/unmerge of weights and biases, save/load, disabled,
# count, gradients, compositions, peft cross-load) run for both scalings in test_invariants.py.

SHAPE_CASES = [pytest.param(METHOD[name], KIND[kind], dtype, id=f"{kind}-{name}-{str(dtype).removeprefix('torch.')}")
               for name in ("ia3", "ia3_ff") for kind in METHOD[name].kinds for dtype in DTYPES]


@pytest.mark.parametrize(("method", "kind", "dtype"), SHAPE_CASES)
def test_fresh_vector_is_ones_in_peft_shape(method: Method, kind: Kind, dtype: torch.dtype) -> None:
    """``ia3_l`` in fp32, all ones, shaped as peft's: ``(out, 1)`` / ``(1, in)`` on linear kinds,
    ``(1, channels, 1, ...)`` on Conv2d/Conv3d."""
    model = adapted(method, kind, dtype, random=False)
    l = delta_of(model).ia3_l
    feedforward = method.name == "ia3_ff"
    channels = kind.in_features if feedforward else kind.out_features
    if kind.kernel:
        assert l.shape == (1, channels, *(1,) * len(kind.kernel))
    else:
        assert l.shape == ((1, channels) if feedforward else (channels, 1))
    assert l.dtype == torch.float32 and torch.equal(l, torch.ones_like(l))


def test_trainable_count_formula_on_llama() -> None:
    model = dt.attach(tiny_llama(), dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]))
    layers = 2
    expected = layers * (16 + 16 + 64)  # k and v: out (2 kv heads x 8); down_proj: in (intermediate)
    assert dt.trainable_parameters(model)[0] == expected


# ---------------------------------------------------------------------------------- config rules

def test_config_json_keys_and_round_trip() -> None:
    config = dt.IA3Config(target_modules=["v", "k", "k"], feedforward_modules=["k"])
    data = config.to_peft_dict()
    theirs = peft.IA3Config(target_modules=["v", "k"], feedforward_modules=["k"]).to_dict()
    assert set(data) | {"auto_mapping", "peft_version"} == set(theirs)
    assert data["target_modules"] == ["k", "v"] and data["peft_type"] == "IA3"
    assert dt.IA3Config.from_peft_dict(data) == config


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"target_modules": ["k", "v"], "feedforward_modules": ["w0"]}, "feedforward_modules"),
    ({"target_modules": ["k"], "feedforward_modules": [], "init_ia3_weights": "ones"}, "init_ia3_weights"),
    ({"target_modules": ["k"], "feedforward_modules": [], "fan_in_fan_out": 1}, "fan_in_fan_out"),
    ({"target_modules": ["k"], "feedforward_modules": "(", }, "feedforward_modules"),
    ({"target_modules": ["k"], "feedforward_modules": [""]}, "feedforward_modules"),
    ({"target_modules": ["k"], "feedforward_modules": [], "layers_to_transform": [0]}, "layers_to_transform"),
])
def test_config_errors_name_field_value_and_fix(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(dt.ConfigError) as info:
        dt.IA3Config(**kwargs)
    message = str(info.value)
    assert field in message and "fix" in message.lower()


def test_regex_targets_skip_subset_rule_and_no_condensing() -> None:
    dt.IA3Config(target_modules=r".*k", feedforward_modules=["anything"])
    model = tiny_llama()
    names = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n})
    dt.attach(model, dt.IA3Config(target_modules=names, feedforward_modules=[n for n in names if "down" in n]))
    assert list(model.deltatune_state.configs["default"].target_modules) == names


@pytest.mark.parametrize("target", ["embed", "conv1"])
def test_unsupported_layers_raise_and_leave_model_unchanged(target: str) -> None:
    model = conv_net()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match="Conv2d and Conv3d"):
        dt.attach(model, dt.IA3Config(target_modules=[target, "head"], feedforward_modules=[]))
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")
