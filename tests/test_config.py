"""LoraConfig: validation at construction, freezing, and the peft adapter_config.json round trip.

Every invalid value must raise ``dt.ConfigError`` naming the field, showing the value and
saying how to fix it (principle 4). Valid configs round-trip through ``to_peft_dict`` /
``from_peft_dict`` and through JSON, and peft itself must accept the dict deltatune writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.config import TASK_TYPES

import peft

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- invalid values

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"r": 0}, "r"),
    ({"r": -1}, "r"),
    ({"r": 1.5}, "r"),
    ({"r": True}, "r"),
    ({"r": "8"}, "r"),
    ({"lora_alpha": "x"}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_dropout": "0.1"}, "lora_dropout"),
    ({"bias": "some"}, "bias"),
    ({"init_lora_weights": "foo"}, "init_lora_weights"),
    ({"init_lora_weights": "pissa_niter_"}, "init_lora_weights"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
    ({"rank_pattern": {"(q_proj": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({"target_modules": "(unclosed"}, "target_modules"),
    ({"target_modules": ["q_proj", ""]}, "target_modules"),
    ({"target_modules": ["q_proj", 3]}, "target_modules"),
    ({"target_modules": 5}, "target_modules"),
    ({"exclude_modules": "[a"}, "exclude_modules"),
    ({"layers_to_transform": -1}, "layers_to_transform"),
    ({"layers_to_transform": [0, -1]}, "layers_to_transform"),
    ({"layers_to_transform": True}, "layers_to_transform"),
    ({"layers_to_transform": "0"}, "layers_to_transform"),
    ({"target_modules": r".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": r".*q_proj", "layers_to_transform": 1}, "layers_to_transform"),
    ({"layers_pattern": [""]}, "layers_pattern"),
    ({"modules_to_save": [""]}, "modules_to_save"),
    ({"modules_to_save": "classifier"}, "modules_to_save"),
    ({"modules_to_save": [1]}, "modules_to_save"),
    ({"task_type": "FOO"}, "task_type"),
    ({"task_type": "causal_lm"}, "task_type"),
    ({"use_dora": 1}, "use_dora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"inference_mode": 1}, "inference_mode"),
]


@pytest.mark.parametrize(("fields", "field"), INVALID, ids=[f"{f}" for f, _ in INVALID])
def test_invalid_value_raises_config_error_naming_field_value_and_fix(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(dt.ConfigError) as info:
        dt.LoraConfig(**fields)
    err = info.value
    message = str(err)
    assert err.field == field
    assert f"LoraConfig.{field}=" in message
    shown = repr(fields[field])
    frozen = repr(tuple(fields[field])) if isinstance(fields[field], list) else shown
    assert shown in message or frozen in message, message
    assert "Fix:" in message
    assert isinstance(err, ValueError)  # generic code catching ValueError keeps working


def test_replace_validates_again() -> None:
    config = dt.LoraConfig(r=4)
    assert config.replace(r=16).r == 16
    with pytest.raises(dt.ConfigError, match="Fix:"):
        config.replace(r=0)
    assert config.r == 4


# Regression (fixed upstream in 02fc6a8): a non-bool flag such as use_rslora="no" is truthy.
@pytest.mark.parametrize("field", ["use_rslora", "fan_in_fan_out"])
def test_bool_flags_must_be_bools(field: str) -> None:
    with pytest.raises(dt.ConfigError, match=field):
        dt.LoraConfig(**{field: "no"})


# Regression (fixed upstream in 02fc6a8): a non-mapping pattern used to escape as AttributeError, also from a file.
@pytest.mark.parametrize("value", [[4], None, "q_proj"])
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_patterns_must_be_mappings(field: str, value: Any) -> None:
    with pytest.raises(dt.ConfigError, match=field):
        dt.LoraConfig(**{field: value})
    with pytest.raises(dt.DeltatuneError, match=field):
        dt.LoraConfig.from_peft_dict(dt.LoraConfig().to_peft_dict() | {field: value})


# Regression (fixed upstream in 02fc6a8): peft refuses these, so deltatune must not write them.
@pytest.mark.parametrize("fields", [
    {"target_modules": r".*\.q_proj", "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_pattern": "layers"},
])
def test_layers_pattern_combinations_peft_refuses_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # peft refuses these
        peft.LoraConfig(**fields)
    with pytest.raises(dt.ConfigError, match="layers_pattern"):
        dt.LoraConfig(**fields)


# ----------------------------------------------------------------------------- frozen


def test_config_is_frozen() -> None:
    targets = ["q_proj", "v_proj"]
    ranks = {"q_proj": 4}
    config = dt.LoraConfig(target_modules=targets, rank_pattern=ranks, layers_to_transform=[0, 1],
                           modules_to_save=["lm_head"], exclude_modules={"b", "a"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_modules = ("k_proj",)  # type: ignore[misc]
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.layers_to_transform == (0, 1)
    assert config.modules_to_save == ("lm_head",)
    assert config.exclude_modules == ("a", "b")  # a set becomes a sorted tuple
    with pytest.raises(TypeError):
        config.rank_pattern["k_proj"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        config.alpha_pattern["k_proj"] = 2.0  # type: ignore[index]
    # The caller's own objects are copied, not kept.
    targets.append("k_proj")
    ranks["k_proj"] = 2
    assert config.target_modules == ("q_proj", "v_proj")
    assert dict(config.rank_pattern) == {"q_proj": 4}
    # Frozen means usable as a value: hashable, equal copies hash equal, pickles and deep-copies intact.
    twin = dt.LoraConfig(target_modules=("q_proj", "v_proj"), rank_pattern={"q_proj": 4}, layers_to_transform=(0, 1),
                         modules_to_save=("lm_head",), exclude_modules=("a", "b"))
    assert twin == config and hash(twin) == hash(config)
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config


# ----------------------------------------------------------------------------- valid configs

NAME = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "dense", "query", "wi", "lm_head"])
REGEX = st.sampled_from([r".*\.(q|v)_proj", r"model\.layers\.\d+\.mlp\..*_proj", r".*attn.*", "q_proj", r"(?!x).*"])
number = st.one_of(st.integers(-64, 256), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
text = st.one_of(st.none(), st.text(max_size=12))


@st.composite
def valid_fields(draw: st.DrawFn) -> dict[str, Any]:
    """Field values LoraConfig accepts, in the shapes a user (or a JSON file) would pass them."""
    targets = draw(st.one_of(st.none(), st.just("all-linear"), REGEX, st.lists(NAME, max_size=4, unique=True)))
    layer_ok = targets is None or isinstance(targets, list)
    layers = draw(st.one_of(st.none(), st.integers(0, 40), st.lists(st.integers(0, 40), max_size=4))) if layer_ok \
        else None
    fields: dict[str, Any] = {
        "r": draw(st.integers(1, 128)),
        "lora_alpha": draw(number),
        "lora_dropout": draw(st.floats(0, 1, exclude_max=True)),
        "bias": draw(st.sampled_from(["none", "all", "lora_only"])),
        "use_rslora": draw(st.booleans()),
        "fan_in_fan_out": draw(st.booleans()),
        "init_lora_weights": draw(st.one_of(st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
                                            st.integers(1, 20).map(lambda k: f"pissa_niter_{k}"))),
        "rank_pattern": draw(st.dictionaries(st.one_of(NAME, REGEX), st.integers(1, 64), max_size=3)),
        "alpha_pattern": draw(st.dictionaries(st.one_of(NAME, REGEX), number, max_size=3)),
        "target_modules": targets,
        "exclude_modules": draw(st.one_of(st.none(), REGEX, st.lists(NAME, max_size=3, unique=True))),
        "layers_to_transform": layers,
        "layers_pattern": None if layers is None else draw(st.one_of(
            st.none(), st.sampled_from(["layers", "h"]), st.lists(st.sampled_from(["layers", "h", "block"]), max_size=2))),
        "modules_to_save": draw(st.one_of(st.none(), st.lists(NAME, max_size=2, unique=True))),
        "task_type": draw(st.one_of(st.none(), st.sampled_from(TASK_TYPES))),
        "base_model_name_or_path": draw(text),
        "revision": draw(text),
        "inference_mode": draw(st.booleans()),
    }
    kept = {k: v for k, v in fields.items() if draw(st.booleans()) or k == "r"}  # some left at their defaults
    if kept.get("layers_to_transform") is None:
        kept.pop("layers_pattern", None)  # peft (and deltatune) want layers_pattern only with layers_to_transform
    return kept


@PROPERTY
@given(valid_fields())
def test_valid_config_round_trips_through_peft_dict_and_json(fields: dict[str, Any]) -> None:
    config = dt.LoraConfig(**fields)
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA"
    text_form = json.dumps(data)  # JSON-serializable as it stands
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a round trip must not warn about anything
        assert dt.LoraConfig.from_peft_dict(data) == config
        assert dt.LoraConfig.from_peft_dict(json.loads(text_form)) == config
    assert json.loads(json.dumps(dt.LoraConfig.from_peft_dict(json.loads(text_form)).to_peft_dict())) == \
        json.loads(text_form)


def _normal(value: Any) -> Any:
    """peft keeps target/exclude lists as sets and task types as enums; compare on plain JSON values."""
    if isinstance(value, (set, frozenset, list, tuple)) and all(isinstance(v, str) for v in value):
        return sorted(value)  # only name lists are string lists here, and their order carries no meaning
    if isinstance(value, str):
        return str(value)
    return value


def _unknown_key_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    texts = [str(w.message) for w in caught]
    return [t for t in texts if re.search(r"unexpected keyword|unknown|ignored", t, re.IGNORECASE)]


@PROPERTY
@given(valid_fields())
def test_peft_accepts_the_dict_we_write(fields: dict[str, Any]) -> None:
    data = json.loads(json.dumps(dt.LoraConfig(**fields).to_peft_dict()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
        via_type = peft.PeftConfig.from_peft_type(**data)
    assert not _unknown_key_warnings(caught)
    assert type(via_type) is peft.LoraConfig
    for key, value in data.items():
        if key == "peft_type":
            continue
        assert _normal(getattr(theirs, key)) == _normal(value), key
        assert _normal(getattr(via_type, key)) == _normal(value), key


@settings(max_examples=40, deadline=None)
@given(valid_fields())
def test_peft_from_pretrained_reads_our_json(fields: dict[str, Any]) -> None:
    config = dt.LoraConfig(**fields)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "adapter_config.json").write_text(json.dumps(config.to_peft_dict()), encoding="utf-8")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = peft.PeftConfig.from_pretrained(folder)
        assert not _unknown_key_warnings(caught)
        assert type(theirs) is peft.LoraConfig
        assert theirs.r == config.r and theirs.lora_alpha == config.lora_alpha
        # and peft's own save of it reads back into the same deltatune config
        theirs.save_pretrained(folder)
        back = json.loads(Path(folder, "adapter_config.json").read_text(encoding="utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = dt.LoraConfig.from_peft_dict(back)
    # peft stores name lists as sets, so their order may change; nothing else may.
    for field in ("target_modules", "exclude_modules"):
        assert _normal(getattr(again, field)) == _normal(getattr(config, field))
    unordered = {"target_modules": config.target_modules, "exclude_modules": config.exclude_modules}
    assert again.replace(**unordered) == config


def test_peft_written_config_reads_without_warnings(tmp_path: Path) -> None:
    theirs = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                             layers_pattern="layers", rank_pattern={"q_proj": 2}, task_type="CAUSAL_LM")
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert "peft_version" in data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dt.LoraConfig.from_peft_dict(data)
    assert ours.r == 4 and ours.lora_alpha == 16 and set(ours.target_modules) == {"q_proj", "v_proj"}
    assert ours.layers_to_transform == (0,) and ours.layers_pattern == "layers"
    assert dict(ours.rank_pattern) == {"q_proj": 2} and ours.task_type == "CAUSAL_LM"


# ----------------------------------------------------------------------------- reading peft dicts


def test_unknown_keys_warn_once_listing_them_all() -> None:
    data = dt.LoraConfig(r=4).to_peft_dict() | {"zz_future_option": 1, "another_new_key": [1, 2], "peft_version": "9"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = dt.LoraConfig.from_peft_dict(data)
    assert config == dt.LoraConfig(r=4)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "zz_future_option" in message and "another_new_key" in message
    assert "peft_version" not in message


@pytest.mark.parametrize(("key", "value"), [
    ("use_bdlora", True),
    ("layer_replication", [[0, 1]]),
    ("trainable_token_indices", [1, 2]),
    ("alora_invocation_tokens", [5]),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("eva_config", {"rho": 2.0}),
])
def test_unsupported_peft_feature_switched_on_is_refused(key: str, value: Any) -> None:
    data = dt.LoraConfig(r=4).to_peft_dict() | {key: value}
    with pytest.raises(dt.AdapterFileError, match=re.escape(key)):
        dt.LoraConfig.from_peft_dict(data)


@pytest.mark.parametrize("off", [None, False, {}, [], ""])
def test_unsupported_peft_feature_switched_off_is_accepted(off: Any) -> None:
    data = dt.LoraConfig(r=4).to_peft_dict() | {"layer_replication": off, "use_bdlora": off}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dt.LoraConfig.from_peft_dict(data) == dt.LoraConfig(r=4)


def test_unimplemented_field_in_file_is_refused_with_its_name() -> None:
    """lora_bias is a field, so it fails validation (ConfigError) rather than the file check."""
    for key in ("lora_bias",):
        with pytest.raises(dt.DeltatuneError, match=key):
            dt.LoraConfig.from_peft_dict(dt.LoraConfig().to_peft_dict() | {key: True})


VALID_WORDS = ("none", "all", "lora_only", "gaussian", "pissa", "olora", "pissa_niter_2", "q_proj", "LORA",
               *TASK_TYPES)
"""Strings some fields accept, so the fuzzer also reaches the accepting path for string-valued fields."""
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5)
                    | st.sampled_from(VALID_WORDS),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)
FUZZ_BASE = dt.LoraConfig(r=4, target_modules=["q_proj"]).to_peft_dict()
FUZZED_KEYS = sorted(FUZZ_BASE)


def _switched_off(value: Any) -> bool:
    """peft's "feature off" values, which deltatune accepts for the peft features it lacks."""
    return value is None or value is False or value == {} or value == [] or value == ""


def _as_written(key: str, value: Any) -> Any:
    """What ``to_peft_dict`` writes back for an accepted ``key: value`` read from a file."""
    if key in dt.LoraConfig.peft_ignored:  # no effect in deltatune: written with peft's default
        return dt.LoraConfig.peft_ignored[key]
    if key in dt.LoraConfig.peft_unsupported:  # accepted only while off: written with peft's default
        return dt.LoraConfig.peft_unsupported[key]
    if key in ("target_modules", "exclude_modules", "target_parameters") and isinstance(value, list) and all(
            isinstance(v, str) and v for v in value):
        return sorted(set(value))  # peft keeps these name lists as sets
    return value


@PROPERTY
@example("r", 1)  # a valid value: the old test expected r == 4 whatever was injected
@example("alpha_pattern", {"(": 1})  # an invalid key in alpha_pattern was reported as rank_pattern
@example("use_qalora", 0)  # 0 == False: peft's default, so accepted
@example("layer_replication", [[0, 1]])
@example("megatron_core", [1, {"x": None}])
@example("peft_type", "IA3")
@given(st.sampled_from(FUZZED_KEYS), JSON)
def test_any_json_value_gives_a_config_or_a_deltatune_error(key: str, value: Any) -> None:
    """A hand-edited adapter_config.json gives the config it describes, or a deltatune error naming the
    key; never a stray AttributeError / TypeError, and never a config that silently differs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = dt.LoraConfig.from_peft_dict(FUZZ_BASE | {key: value})
        except dt.DeltatuneError as err:
            assert key in str(err)
            assert key not in dt.LoraConfig.peft_ignored, "keys with no effect accept any value"
            if key in dt.LoraConfig.peft_unsupported:  # refused only while switched on
                assert isinstance(err, dt.AdapterFileError)
                assert not _switched_off(value) and value != dt.LoraConfig.peft_unsupported[key]
            elif key == "peft_type":
                assert isinstance(err, dt.AdapterFileError) and value != "LORA"
            else:  # a field: the error is about that field, not another one
                assert isinstance(err, dt.ConfigError) and err.field == key
            return
    # Accepted: the injected value is kept (as peft would write it back) and nothing else changed.
    written = json.loads(json.dumps(config.to_peft_dict()))
    assert written == FUZZ_BASE | {key: _as_written(key, value)}


def test_wrong_peft_type_is_refused() -> None:
    with pytest.raises(dt.AdapterFileError, match="IA3"):
        dt.LoraConfig.from_peft_dict(dt.LoraConfig().to_peft_dict() | {"peft_type": "IA3"})


def test_to_peft_dict_has_every_key_peft_writes(tmp_path: Path) -> None:
    peft.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    theirs = set(json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8")))
    ours = set(dt.LoraConfig(r=4, target_modules=["q_proj"]).to_peft_dict())
    # auto_mapping and peft_version are added when saving (dt.save adds auto_mapping).
    assert theirs - ours <= {"auto_mapping", "peft_version"}
    assert ours <= theirs
