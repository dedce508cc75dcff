"""The command line as a newcomer meets it: YAML numbers, misspelt YAML keys, messages, help texts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deltatune.cli import build_parser, main, read_yaml
from deltatune.errors import ConfigError
from deltatune.train.options import split_options


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nweight-decay: 5E-2\nmax_steps: 7\n")  # PyYAML (YAML 1.1) reads 1e-3 as a string
    values = read_yaml(config)
    assert values == {"lr": 1e-3, "weight_decay": 5e-2, "max_steps": 7}
    _, train = split_options(values)
    assert (train.lr, train.weight_decay, train.max_steps) == (1e-3, 5e-2, 7)


@pytest.mark.parametrize("text,key,suggestion", [("lrr: 0.1\n", "lrr", "did you mean lr?"),
                                                 ("max-stepz: 3\n", "max-stepz", "did you mean max_steps?")])
def test_unknown_yaml_key_names_the_file_and_the_closest_option(tmp_path: Path, text: str, key: str,
                                                                 suggestion: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        read_yaml(config)
    assert str(config) in str(error.value) and key in str(error.value) and suggestion in str(error.value)


def test_unknown_yaml_key_through_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("lrr: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "did you mean lr?" in err


@pytest.mark.parametrize("text,expected", [("r: 2.5\n", "give r an int value"),
                                           ("lr: fast\n", "give lr a float value"),
                                           ("bf16: 3\n", "give bf16 a bool value")])
def test_type_errors_read_as_english(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        split_options(read_yaml(config))


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {action.dest: action.help or "" for action in parser._actions}


def test_every_train_option_states_one_default() -> None:
    _, subcommands = build_parser()
    helps = _helps(subcommands["train"])
    for dest, text in helps.items():
        if dest not in ("help", "config"):
            assert text.count("default:") == 1, (dest, text)
    assert "all-MiniLM-L6-v2" in helps["model"] and "(default: ''" not in helps["model"]
    assert "sentiment" in helps["train_file"] and "(default: ''" not in helps["train_file"]
    assert helps["target_modules"].endswith("default: the architecture's attention projections")
    assert helps["columns"].endswith("(default: none)")  # an empty list reads as none, not ()


def test_source_help_fits_each_command() -> None:
    _, subcommands = build_parser()
    for name in ("eval", "predict"):
        text = _helps(subcommands[name])["source"]
        assert "run folder" in text and "merge" not in text and "inspect" not in text and "adapter folder" not in text
    for name in ("merge", "inspect"):
        assert "adapter folder" in _helps(subcommands[name])["source"]


@pytest.mark.parametrize("peft_type,heading", [("IA3", "an ia3 adapter"), ("ADALORA", "an adalora adapter"),
                                               ("LORA", "a lora adapter"), ("", "a peft adapter")])
def test_model_card_heading_reads_as_english(peft_type: str, heading: str) -> None:
    from deltatune.model_card import card_text

    card = card_text({"peft_type": peft_type}, "default", "0.1.0", transformers_model=False)
    assert f"# default: {heading}\n" in card
