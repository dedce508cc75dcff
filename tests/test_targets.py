"""Targeting follows peft's rules exactly: property tests against peft's own matcher, the
documented rules by example, ``nearest_names``, and whole models compared with ``get_peft_model``.

The oracle is ``peft.tuners.tuners_utils.check_target_module_exists`` on a ``peft.LoraConfig``
built from the same fields. peft answers ``_ExcludedModule`` (falsy) for excluded keys and a
``re.Match`` (truthy) for a regular expression hit; both are compared through ``bool``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import deltatune as dt
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from deltatune.layer import DeltaLayer, SavedModule
from deltatune.targets import condense, is_saved_module, is_target, layer_index, nearest_names

import peft
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import _find_minimal_target_modules, check_target_module_exists  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Leaf names deliberately include suffixes of one another ("proj" / "q_proj", "fc" / "c_fc").
LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "proj", "c_fc", "fc", "c_proj", "c_attn", "wi", "wo",
          "dense", "query", "value", "gate_proj", "up_proj", "down_proj", "lm_head", "classifier", "score"]
CONTAINERS = ["model", "layers", "self_attn", "mlp", "encoder", "decoder", "block", "layer", "DenseReluDense",
              "h", "transformer", "attention", "experts", "blocks"]
PATTERNS = ["layers", "h", "block", "layer", "blocks", "experts"]

segment = st.one_of(st.sampled_from(CONTAINERS), st.integers(0, 12).map(str))
realistic = st.one_of(
    st.builds(lambda i, a, leaf: f"model.layers.{i}.{a}.{leaf}", st.integers(0, 12),
              st.sampled_from(["self_attn", "mlp"]), st.sampled_from(LEAVES)),
    st.builds(lambda b, i, leaf: f"encoder.block.{b}.layer.{i}.DenseReluDense.{leaf}", st.integers(0, 12),
              st.integers(0, 3), st.sampled_from(["wi", "wo"])),
    st.builds(lambda i, a, leaf: f"h.{i}.{a}.{leaf}", st.integers(0, 12), st.sampled_from(["mlp", "attn"]),
              st.sampled_from(["c_fc", "c_proj", "c_attn"])),
    st.builds(lambda i, j, leaf: f"model.layers.{i}.experts.{j}.{leaf}", st.integers(0, 12), st.integers(0, 8),
              st.sampled_from(["w1", "w2", "proj"])),
)
module_names = st.one_of(
    realistic,
    st.builds(lambda parts, leaf: ".".join([*parts, leaf]), st.lists(segment, min_size=0, max_size=6),
              st.sampled_from(LEAVES)),
)


def _suffixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def name_lists(key: str) -> st.SearchStrategy[list[str]]:
    """Lists of names mixing leaf names, dotted suffixes of ``key`` (often matching) and unrelated full names."""
    pool = st.one_of(st.sampled_from(LEAVES), st.sampled_from(_suffixes(key)), module_names,
                     st.sampled_from(CONTAINERS))
    return st.lists(pool, min_size=0, max_size=4)


def regexes(key: str) -> st.SearchStrategy[str]:
    """Simple, always valid regular expressions, some built from ``key`` so that they hit."""
    leaf = key.rsplit(".", 1)[-1]
    fixed = [r".*\.q_proj", r".*proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r"h\.\d+\.mlp\.c_fc",
             r".*(wi|wo)", "q_proj", r".*\.1\..*", r".*\.(fc|c_fc)", r"(?!.*lm_head).*", ""]
    built = [re.escape(key), rf".*\.{re.escape(leaf)}", re.escape(key)[:-1] + ".", rf".*{re.escape(leaf)}$",
             rf"{re.escape(key)}\..*"]
    return st.sampled_from(fixed + built)


layer_indices = st.one_of(st.none(), st.integers(0, 12), st.lists(st.integers(0, 12), max_size=4))
layer_patterns = st.one_of(st.none(), st.sampled_from([*PATTERNS, ""]),
                           st.lists(st.sampled_from(PATTERNS), min_size=0, max_size=3))
saved_lists = st.one_of(st.none(), st.lists(st.sampled_from(LEAVES + CONTAINERS), min_size=1, max_size=3))


@st.composite
def selections(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A module name and a full set of targeting fields (not all of them accepted by a config)."""
    key = draw(module_names)
    targets = draw(st.one_of(name_lists(key), regexes(key)))
    exclude = draw(st.one_of(st.none(), name_lists(key), regexes(key)))
    fields = {
        "target_modules": targets,
        "exclude_modules": exclude,
        "layers_to_transform": draw(layer_indices),
        "layers_pattern": draw(layer_patterns),
        "modules_to_save": draw(saved_lists),
    }
    return key, fields


def peft_config(fields: dict[str, Any]) -> Any:
    """A peft LoraConfig with these fields; combinations peft's constructor refuses are set afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return peft.LoraConfig(**fields)
        except ValueError:  # e.g. layers_pattern without layers_to_transform: peft's matcher still reads them
            layer_fields = ("layers_to_transform", "layers_pattern")
            config = peft.LoraConfig(**{k: v for k, v in fields.items() if k not in layer_fields})
            for name in layer_fields:
                setattr(config, name, fields[name])
            return config


def peft_says(fields: dict[str, Any], key: str) -> bool:
    return bool(check_target_module_exists(peft_config(fields), key))


def ours_says(fields: dict[str, Any], key: str, as_tuples: bool = False) -> bool:
    conv: Callable[[Any], Any] = (lambda v: tuple(v) if isinstance(v, list) else v) if as_tuples else (lambda v: v)
    return is_target(key, conv(fields["target_modules"]), conv(fields["exclude_modules"]),
                     conv(fields["layers_to_transform"]), conv(fields["layers_pattern"]),
                     conv(fields["modules_to_save"] or ()))


# ----------------------------------------------------------------------------- property tests


@PROPERTY
@given(selections())
def test_is_target_agrees_with_peft(selection: tuple[str, dict[str, Any]]) -> None:
    key, fields = selection
    expected = peft_says(fields, key)
    assert ours_says(fields, key) == expected, (key, fields)
    # A frozen config hands lists over as tuples: the answer must not depend on that.
    assert ours_says(fields, key, as_tuples=True) == expected, (key, fields)


@PROPERTY
@given(selections())
def test_config_fields_select_what_peft_selects(selection: tuple[str, dict[str, Any]]) -> None:
    """Through a validated dt.LoraConfig (fields frozen to tuples), whenever the config is valid."""
    key, fields = selection
    try:
        config = dt.LoraConfig(**fields)
    except dt.ConfigError:
        return
    ours = is_target(key, config.target_modules, config.exclude_modules, config.layers_to_transform,
                     config.layers_pattern, config.saved_module_names())
    assert ours == peft_says(fields, key), (key, fields)


@PROPERTY
@given(module_names, st.lists(st.sampled_from(LEAVES + CONTAINERS), min_size=1, max_size=3))
def test_saved_modules_never_targeted(key: str, saved: list[str]) -> None:
    fields = {"target_modules": _suffixes(key), "exclude_modules": None, "layers_to_transform": None,
              "layers_pattern": None, "modules_to_save": saved}
    inside = is_saved_module(key, saved)
    assert ours_says(fields, key) == (not inside) == peft_says(fields, key)


@PROPERTY
@given(module_names, st.one_of(st.none(), st.sampled_from(PATTERNS), st.lists(st.sampled_from(PATTERNS), max_size=3)))
def test_layer_index_is_the_one_peft_uses(key: str, pattern: str | list[str] | None) -> None:
    """Selecting exactly the layer ``layer_index`` reports is what peft selects too."""
    index = layer_index(key, pattern)
    leaf = key.rsplit(".", 1)[-1]
    for layers in ([index] if index is not None else [0, 5, 12]):
        fields = {"target_modules": [leaf], "exclude_modules": None, "layers_to_transform": layers,
                  "layers_pattern": pattern, "modules_to_save": None}
        if key == leaf:
            continue  # an exact full name bypasses the layer filter
        assert peft_says(fields, key) == (index is not None)
        assert ours_says(fields, key) == (index is not None)


# ----------------------------------------------------------------------------- documented rules


Q = "model.layers.3.self_attn.q_proj"


@pytest.mark.parametrize(("targets", "expected"), [
    (["q_proj"], True),                      # leaf name
    (["self_attn.q_proj"], True),            # dotted suffix
    ([Q], True),                             # exact full name
    (["proj"], False),                       # a suffix, but not a dotted one
    (["_proj"], False),
    (["attn.q_proj"], False),                # the suffix must start at a dot
    (["layers.3"], False),                   # a container is not its children
    (["k_proj", "v_proj"], False),
    ([], False),
])
def test_list_entries_match_full_name_or_dotted_suffix(targets: list[str], expected: bool) -> None:
    assert is_target(Q, targets) is expected
    assert bool(check_target_module_exists(peft.LoraConfig(target_modules=targets), Q)) is expected


@pytest.mark.parametrize(("regex", "expected"), [
    ("q_proj", False),                        # full match, not search
    (r".*q_proj", True),
    (r".*\.q_pro", False),
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", True),
    (r"model\.layers\.[0-2]\..*", False),
    (Q, True),
])
def test_string_is_a_full_match_regex(regex: str, expected: bool) -> None:
    assert is_target(Q, regex) is expected
    assert bool(check_target_module_exists(peft.LoraConfig(target_modules=regex), Q)) is expected


def test_exclude_wins_over_target() -> None:
    assert not is_target(Q, ["q_proj"], exclude_modules=["q_proj"])
    assert not is_target(Q, r".*proj", exclude_modules=r".*\.3\..*")
    assert is_target(Q, r".*proj", exclude_modules=r"\.3\.")  # exclude regexes full-match too
    assert is_target(Q, ["q_proj"], exclude_modules=["proj"])  # and lists use the dotted-suffix rule
    assert is_target(Q, ["q_proj"], exclude_modules="")        # an empty exclude excludes nothing


def test_modules_to_save_and_their_children_are_never_targets() -> None:
    assert not is_target("classifier", ["classifier"], modules_to_save=["classifier"])
    assert not is_target("bert.pooler.classifier.dense", ["dense"], modules_to_save=["classifier"])
    assert is_target("bert.pooler.dense", ["dense"], modules_to_save=["classifier"])
    assert is_target("model.my_classifier", ["my_classifier"], modules_to_save=["classifier"])
    assert is_saved_module("a.classifier.out_proj", ["classifier"])
    assert not is_saved_module("a.classifier_x", ["classifier"])


@pytest.mark.parametrize(("key", "pattern", "index"), [
    ("model.layers.3.self_attn.q_proj", None, 3),
    ("model.layers.1.experts.0.w1", None, 1),               # the first number, not the expert index
    ("model.layers.1.experts.0.w1", "experts", 0),
    ("encoder.block.2.layer.1.DenseReluDense.wi", "block", 2),
    ("encoder.block.2.layer.1.DenseReluDense.wi", "layer", 1),
    ("encoder.block.2.layer.1.DenseReluDense.wi", ["nope", "layer"], 1),
    ("h.12.mlp.c_fc", None, None),                          # no ".<name>.<n>." after a first segment
    ("h.12.mlp.c_fc", "h", 12),
    ("transformer.h.12.mlp.c_fc", None, 12),
    ("lm_head", None, None),
    ("model.layers.3.self_attn.q_proj", "h", None),
    ("model.layers.3.self_attn.q_proj", "", 3),             # an empty pattern means any
    ("model.layers.3.self_attn.q_proj", [], 3),
])
def test_layer_index(key: str, pattern: str | list[str] | None, index: int | None) -> None:
    assert layer_index(key, pattern) == index


def test_layers_to_transform() -> None:
    key = "model.layers.3.self_attn.q_proj"
    assert is_target(key, ["q_proj"], layers_to_transform=3)
    assert is_target(key, ["q_proj"], layers_to_transform=[1, 3])
    assert not is_target(key, ["q_proj"], layers_to_transform=[1, 2])
    assert not is_target(key, ["q_proj"], layers_to_transform=0)
    assert is_target(key, ["q_proj"], layers_to_transform=[])        # an empty list filters nothing
    assert is_target(key, [key], layers_to_transform=[0])            # an exact full name bypasses it
    assert is_target(key, r".*q_proj", layers_to_transform=[0])      # a regex ignores it
    assert not is_target("lm_head.q_proj", ["q_proj"], layers_to_transform=[0])  # no index -> not selected
    assert is_target("encoder.block.2.layer.1.DenseReluDense.wi", ["wi"], layers_to_transform=1,
                     layers_pattern="layer")
    assert not is_target("encoder.block.2.layer.1.DenseReluDense.wi", ["wi"], layers_to_transform=1,
                         layers_pattern="block")


# ----------------------------------------------------------------------------- nearest_names

NAMES = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
         "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "model.norm", "lm_head"]


def test_nearest_names_suggests_the_close_leaf() -> None:
    found = nearest_names(["q_projj"], NAMES)
    assert found[0] == "q_proj"
    assert "k_proj" in found or "v_proj" in found


def test_nearest_names_is_limited_and_unique() -> None:
    found = nearest_names(["q_proj", "k_proj", "v_proj", "_proj"], NAMES, limit=3)
    assert len(found) <= 3
    assert len(found) == len(set(found))


def test_nearest_names_falls_back_to_leaves() -> None:
    assert nearest_names(["zzzzzzzzzz"], NAMES, limit=4) == sorted({n.rsplit(".", 1)[-1] for n in NAMES})[:4]
    assert nearest_names([], NAMES, limit=2) == sorted({n.rsplit(".", 1)[-1] for n in NAMES})[:2]
    assert nearest_names(["q_proj"], []) == []


@PROPERTY
@given(st.lists(st.sampled_from(LEAVES), max_size=3), st.lists(module_names, max_size=8), st.integers(1, 6))
def test_nearest_names_only_suggests_real_names(wanted: list[str], names: list[str], limit: int) -> None:
    found = nearest_names(wanted, names, limit)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert len(found) <= limit
    assert len(found) == len(set(found))
    assert all(f in leaves or f in names for f in found)


# ----------------------------------------------------------------------------- whole models vs peft


def _ours(model: nn.Module) -> tuple[set[str], set[str]]:
    wrapped = {n for n, m in model.named_modules() if isinstance(m, DeltaLayer)}
    saved = {n for n, m in model.named_modules() if isinstance(m, SavedModule)}
    return wrapped, saved


def _peft(model: Any) -> tuple[set[str], set[str]]:
    inner = model.base_model.model
    wrapped = {n for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    saved = {n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    return wrapped, saved


CASES: list[tuple[Callable[[], nn.Module], dict[str, Any]]] = [
    (tiny_llama, {}),
    (tiny_llama, {"target_modules": "all-linear"}),
    (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    (tiny_llama, {"target_modules": ["self_attn.o_proj", "model.layers.0.mlp.up_proj"]}),
    (tiny_llama, {"target_modules": r".*\.(q|k)_proj"}),
    (tiny_llama, {"target_modules": r"model\.layers\.1\.mlp\.\w+_proj"}),
    (tiny_llama, {"target_modules": ["q_proj", "o_proj", "down_proj"], "layers_to_transform": [1]}),
    (tiny_llama, {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    (tiny_llama, {"target_modules": "all-linear", "exclude_modules": ["o_proj", "mlp.up_proj"]}),
    (tiny_llama, {"target_modules": "all-linear", "exclude_modules": r".*\.0\..*"}),
    (tiny_llama, {"target_modules": ["q_proj", "embed_tokens"]}),
    (tiny_gpt2, {}),
    (tiny_gpt2, {"target_modules": "all-linear"}),
    (tiny_gpt2, {"target_modules": ["c_attn", "mlp.c_proj"], "layers_to_transform": [1], "layers_pattern": "h"}),
    (tiny_bert, {"task_type": "SEQ_CLS"}),
    (tiny_bert, {"task_type": "SEQ_CLS", "target_modules": "all-linear"}),
    (tiny_bert, {"task_type": "SEQ_CLS", "target_modules": ["query", "dense"], "exclude_modules": ["pooler.dense"]}),
    (tiny_bert, {"target_modules": ["query", "value"], "modules_to_save": ["pooler"]}),
]


@pytest.mark.parametrize(("make", "fields"), CASES, ids=[f"{m.__name__}-{f}" for m, f in CASES])
def test_attach_wraps_what_get_peft_model_wraps(make: Callable[[], nn.Module], fields: dict[str, Any]) -> None:
    ours = make()
    dt.attach(ours, dt.LoraConfig(r=2, **fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, **fields))
    our_wrapped, our_saved = _ours(ours)
    peft_wrapped, peft_saved = _peft(theirs)
    assert our_wrapped, "the case must select something"
    assert our_wrapped == peft_wrapped, (sorted(our_wrapped - peft_wrapped), sorted(peft_wrapped - our_wrapped))
    assert our_saved == peft_saved


def test_all_linear_leaves_the_output_head_alone() -> None:
    for make, head in ((tiny_llama, "lm_head"), (tiny_gpt2, "lm_head")):
        model = make()
        dt.attach(model, dt.LoraConfig(target_modules="all-linear"))
        wrapped, _ = _ours(model)
        assert head not in wrapped
        assert not isinstance(model.get_submodule(head), DeltaLayer)
    bert = tiny_bert()
    dt.attach(bert, dt.LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    wrapped, saved = _ours(bert)
    assert "classifier" not in wrapped and saved == {"classifier"}
    assert "bert.pooler.dense" in wrapped


def test_second_attach_targets_the_same_modules() -> None:
    """Wrapped layers stand for their base layer, so a second adapter selects the same names."""
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(target_modules="all-linear"), name="a")
    first, _ = _ours(model)
    dt.attach(model, dt.LoraConfig(target_modules="all-linear"), name="b")
    second, _ = _ours(model)
    assert first == second
    assert all(set(model.get_submodule(n).deltas) == {"a", "b"} for n in second)


_LEAVES = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "proj", "fc", "c_fc", "wi", "wo", "dense"])
_MODULE_NAME = st.builds(
    lambda stack, i, block, leaf: f"{stack}.{i}.{block}.{leaf}",
    st.sampled_from(["model.layers", "encoder.block", "decoder.block", "h"]), st.integers(0, 3),
    st.sampled_from(["self_attn", "mlp", "attn", "layer.0"]), _LEAVES,
)


@settings(max_examples=150, deadline=None)
@given(st.sets(_MODULE_NAME, min_size=2, max_size=40), st.data())
def test_condense_matches_peft(names: set[str], data: st.DataObject) -> None:
    """Long target lists are shortened exactly as peft does, and still select the same modules."""
    ordered = sorted(names)
    targets = set(data.draw(st.lists(st.sampled_from(ordered), min_size=1, unique=True)))
    others = [n for n in ordered if n not in targets and not any(n.endswith(f".{t}") for t in targets)]
    ours = condense(targets, others)
    theirs = _find_minimal_target_modules(targets, others)
    assert set(ours) == (theirs if len(theirs) < len(targets) else targets)
    for name in ordered:
        selected = name in ours or any(name.endswith(f".{t}") for t in ours)
        assert selected == (name in targets or any(name.endswith(f".{t}") for t in targets))
