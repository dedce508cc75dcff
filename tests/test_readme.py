"""README.md as a reader uses it: every code block runs or parses as written, and what it names exists.

* ``python`` blocks run, in order, as one script in an empty folder (the second Quickstart block
  continues the first), in a fresh interpreter of this environment.
* ``bash`` blocks: every ``deltatune`` line parses with the command's own parser (``...`` stands
  for "the options you like" and is dropped); ``make`` targets exist in the Makefile; the
  ``.venv`` paths are where ``make demo`` installs. A line of any other command fails the test,
  so a new kind of line needs a check here.
* Links to files, ``dt.*`` names, ``deltatune[extra]`` extras and the quoted error exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.cli import build_parser, read_yaml
from deltatune.errors import ConfigError
from deltatune.train.options import split_options

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def shell_commands() -> list[list[str]]:
    """Each command of the bash blocks as words, comments and ``...`` placeholders removed."""
    commands = []
    for body in blocks("bash"):
        for line in body.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
            lexer.whitespace_split = True
            words: list[str] = []
            for word in [*lexer, ";"]:
                if word == ";":
                    if words:
                        commands.append(words)
                    words = []
                elif word != "...":
                    words.append(word)
    return commands


def test_readme_has_the_blocks_this_test_checks() -> None:
    assert len(blocks("python")) >= 2 and len(shell_commands()) >= 10
    assert {lang for lang, _ in BLOCK.findall(README)} <= {"python", "bash", "yaml"}  # no block goes unchecked


def test_python_blocks_run_as_written(tmp_path: Path) -> None:
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks("python")), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable:" in result.stdout  # dt.summary printed
    for folder in ("out", "other"):
        assert (tmp_path / folder / "adapter_config.json").is_file()
        assert (tmp_path / folder / "adapter_model.safetensors").is_file()


def test_every_deltatune_line_parses_with_the_real_parser() -> None:
    parser, _ = build_parser()
    lines = [words for words in shell_commands() if Path(words[0]).name == "deltatune"]
    assert len(lines) >= 10
    for words in lines:
        if words[1:] == ["--help"] or words[-1] == "--help":
            continue  # argparse prints and exits; the console-script test below runs one for real
        args, extra = parser.parse_known_args(words[1:])
        assert not extra, (words, extra)
        assert args.command == words[1]


def test_yaml_blocks_are_valid_run_configs(tmp_path: Path) -> None:
    assert blocks("yaml")
    for i, body in enumerate(blocks("yaml")):
        path = tmp_path / f"run{i}.yaml"
        path.write_text(body, encoding="utf-8")
        values = read_yaml(path)
        run, train = split_options(values)
        chosen = {**run.flat(), **asdict(train)}
        assert values and all(chosen[key] == value for key, value in values.items()), (values, chosen)
        assert "lr" not in values or isinstance(values["lr"], float)  # `lr: 1e-3` is a string to PyYAML


def test_every_other_shell_line_is_a_make_target_or_the_environment() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^VENV \?= \.venv$", makefile, re.MULTILINE)  # where make demo installs
    for words in shell_commands():
        if Path(words[0]).name == "deltatune":
            assert words[0] in ("deltatune", ".venv/bin/deltatune"), words
        elif words[0] == "make":
            assert all(re.search(rf"^{target}:", makefile, re.MULTILINE) for target in words[1:]), words
        else:
            assert words == ["source", ".venv/bin/activate"], f"README runs {words}: add a check for it here"


def test_the_console_script_sits_beside_the_environments_python() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["deltatune"] == "deltatune.cli:main"
    command = Path(sys.executable).parent / "deltatune"  # .venv/bin/deltatune in a make demo install
    result = subprocess.run([str(command), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--lr" in result.stdout
    assert (Path(sys.executable).parent / "activate").is_file()


def test_linked_files_exist_and_nothing_outside_the_project_is_cited() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    assert "../shared" not in README
    for path in re.findall(r"`((?:src|docs|bench|examples|tests)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), path


def test_named_api_and_extras_exist() -> None:
    for dotted in sorted(set(re.findall(r"\bdt\.([A-Za-z_][\w.]*[A-Za-z_\d])", README))):
        target: object = dt
        for part in dotted.split("."):
            target = getattr(target, part)  # AttributeError names what the README promises wrongly
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for extra in re.findall(r"deltatune\[(\w+)\]", README):
        assert extra in extras, extra


def test_the_quoted_config_error_is_the_real_one() -> None:
    quoted = re.search(r"raises\n`ConfigError: (.*?)`", README)
    assert quoted is not None
    with pytest.raises(ConfigError) as error:
        dt.LoraConfig(r=0)
    assert str(error.value) == quoted.group(1)


def test_main_job_facts_in_results() -> None:
    """The Results table's setup of `deltatune train` with no arguments: 4,000 training and 1,000
    held-out sentences, 250 steps of batch 16, and the trainable / total parameter counts."""
    from deltatune.hf import load_tokenizer
    from deltatune.train.run import adapter_config, attach_trained, load_data
    from deltatune.train.options import default_model_dir
    from deltatune.train.tasks import task_class
    from deltatune.train.trainer import planned_steps

    run, train = split_options({})
    train_rows, eval_rows = load_data(run)
    assert (len(train_rows.rows), len(eval_rows.rows)) == (4000, 1000)
    assert "4,000 training sentences" in README and "1,000 held-out sentences" in README
    steps = planned_steps(len(train_rows.rows), train, 1)
    assert f"{steps} steps of batch {train.batch_size}" in README and (steps, train.batch_size) == (250, 16)
    model_dir = default_model_dir()
    task = task_class(run.task)(load_tokenizer(model_dir), run.max_length, run.column_map())
    task.fit(train_rows)
    model = task.load_model(model_dir)
    attach_trained(model, adapter_config(run, task, model, steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert f"| trainable parameters | {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) |" in README
    assert f"AdamW at {train.lr:.0e}".replace("e-0", "e-") + f" with {train.warmup_ratio:.0%} warm-up and {train.schedule} decay" in README
