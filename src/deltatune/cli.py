"""The ``deltatune`` command: train, eval, predict, merge, inspect, serve.

``deltatune train`` with no arguments is the main job: the default method on all-MiniLM-L6-v2 for sentiment,
on the data shipped with the package. Every training option is a field of
:class:`~deltatune.train.options.RunOptions` or :class:`~deltatune.train.TrainConfig`; this
module turns those fields into flags (``max_steps`` -> ``--max-steps``) and YAML keys, so the
help text and the valid choices are written once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, DeltatuneError, TrainingError

SCALARS: dict[str, type] = {"int": int, "float": float, "str": str}


class Parser(argparse.ArgumentParser):
    """argparse that suggests the closest option for a misspelt one."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=3)
                if close:
                    message += f" (did you mean {', '.join(close)}?)"
        super().error(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option(parser: argparse.ArgumentParser, f: Any) -> None:
    """One dataclass field as one flag; defaults are left out so that given flags can be told apart."""
    help_text = f"{f.metadata['help']} (default: {f.default!r})"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
    if f.type == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.type.startswith("tuple"):
        kwargs["nargs"] = "*"
    else:
        kwargs["type"] = SCALARS[f.type]
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    parser.add_argument(_flag(f.name), **kwargs)


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The command's parser and its subcommand parsers by name."""
    from .train.options import option_table

    parser = Parser(prog="deltatune", description="Parameter-efficient fine-tuning: train, evaluate, "
                    "predict with, merge and inspect adapters (peft format).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = commands.add_parser("train", help="fine-tune (no arguments: the default method on MiniLM for sentiment)",
                                description="Fine-tune with a delta-tuning method. Flags override --config.")
    train.add_argument("--config", type=Path, help="YAML file of options (keys as the flags, - or _)")
    for _, f in option_table():
        add_option(train, f)
    subcommands: dict[str, Parser] = {"train": train}
    for name, text in (("eval", "evaluate a finished run"), ("predict", "predict with a finished run"),
                       ("merge", "write base + adapter as one transformers model folder"),
                       ("inspect", "show an adapter: config, parameter counts, per-layer ΔW norm and rank")):
        sub = subcommands[name] = commands.add_parser(name, help=text, description=text)
        sub.add_argument("source", type=Path, help="a run folder (train's --output-dir) or, for merge/inspect, "
                         "an adapter folder")
        sub.add_argument("--adapter", default="adapter", choices=("adapter", "best"),
                         help="in a run folder: the final adapter or the best evaluated one (default: adapter)")
        if name == "eval":
            sub.add_argument("--data", default="", help="data file (default: the run's evaluation data)")
            sub.add_argument("--split", default="", help="value of the run's split column to evaluate")
            sub.add_argument("--max-rows", type=int, default=0, help="at most this many rows; 0 = all")
        if name == "predict":
            sub.add_argument("--text", action="append", default=[], help="an input text (repeatable)")
            sub.add_argument("--file", default="", help="a data file whose rows to predict")
        if name in ("merge", "inspect"):
            sub.add_argument("--model", default="", help="base model folder (default: the one the adapter names)")
        if name == "merge":
            sub.add_argument("--output", type=Path, required=True, help="folder for the merged model")
    subcommands["serve"] = add_serve(commands)
    return parser, subcommands


def add_serve(commands: Any) -> Parser:
    """``deltatune serve``: the flags of the HTTP server (docs/serving.md)."""
    text = "serve a model and its adapters over HTTP (OpenAI-compatible; needs the serve extra)"
    sub: Parser = commands.add_parser("serve", help=text, description=text + ". A request picks its adapter by "
                                      "its `model` field; the base model's name means no adapter.")
    sub.add_argument("--model", required=True, help="a transformers model folder or a `deltatune train` run folder "
                     "(causal-lm: text generation; seq-cls: classification), loaded offline")
    sub.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                     help="serve the adapter saved in FOLDER as NAME (repeatable)")
    sub.add_argument("--served-model-name", default="", help="the base model's name in requests (default: the "
                     "model folder's name)")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sub.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    sub.add_argument("--max-batch-size", type=int, default=32, help="most requests computed together (default: 32)")
    sub.add_argument("--max-new-tokens-limit", type=int, default=1024,
                     help="most tokens one request may generate (default: 1024)")
    sub.add_argument("--max-prompt-tokens", type=int, default=0,
                     help="longest prompt accepted, in tokens; 0 = the model's context length (default: 0)")
    sub.add_argument("--device", default="", help="cpu, cuda, cuda:N (default: where the model loads)")
    sub.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    sub.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return sub


def read_yaml(path: Path) -> dict[str, Any]:
    """Options from a YAML mapping; keys may use - or _."""
    import yaml

    if not path.is_file():
        raise ConfigError("deltatune train", "config", str(path), "no such file", "pass an existing YAML file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError("deltatune train", "config", str(path), "is not a YAML mapping", "write `option: value` lines")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def run_train(args: argparse.Namespace) -> int:
    from .train.options import split_options
    from .train.run import train_run

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    values = {**(read_yaml(args.config) if args.config else {}), **given}
    run, train = split_options(values)
    train_run(run, train)
    return 0


def run_other(args: argparse.Namespace) -> int:
    from .train import commands

    if args.command == "eval":
        metrics = commands.evaluate_run(args.source, args.data, args.split, args.adapter, args.max_rows)
        print(commands.to_json(metrics))
    elif args.command == "predict":
        rows = _predict_rows(args)
        for row, prediction in zip(rows, commands.predict_run(args.source, rows, args.adapter), strict=True):
            print(commands.to_json({"input": row, "prediction": prediction}).replace("\n", " "))
    elif args.command == "merge":
        out = commands.merge_to_folder(args.source, args.output, args.model, args.adapter)
        print(f"merged model written to {out}; load it with transformers' from_pretrained")
    else:
        report = commands.inspect_adapter(args.source, args.model)
        layers = report.pop("layers")
        print(commands.to_json(report))
        print(commands.format_layers(layers))
    return 0


def _predict_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .train import commands
    from .train.data import read_rows

    if args.file:
        return read_rows(args.file).rows
    if not args.text:
        raise ConfigError("deltatune predict", "text", None, "no input given", "pass --text '...' or --file FILE")
    column = commands.first_role_column(args.source)
    return [{column: text} for text in args.text]


def run_serve(args: argparse.Namespace) -> int:
    try:
        from . import serve
    except ModuleNotFoundError as error:
        if error.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        return _fail("serve", f"needs {error.name}, which the serve extra installs: pip install 'deltatune[serve]'", 2)
    adapters = [_named_folder(item) for item in args.adapter]
    for flag in ("max_batch_size", "max_new_tokens_limit"):
        if getattr(args, flag) < 1:
            raise ConfigError("deltatune serve", flag, getattr(args, flag), "must be >= 1", "pass a positive integer")
    if args.max_prompt_tokens < 0:
        raise ConfigError("deltatune serve", "max_prompt_tokens", args.max_prompt_tokens, "must be >= 0",
                          "pass 0 (the model's context length) or a positive integer")
    limits = serve.Limits(args.max_batch_size, args.max_new_tokens_limit, args.max_prompt_tokens or None)
    serve.serve(serve.Settings(args.model, adapters, args.served_model_name, args.host, args.port, limits,
                               args.device, args.threads, args.log_level))
    return 0


def _named_folder(item: str) -> tuple[str, str]:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
        raise ConfigError("deltatune serve", "adapter", item, "must look like NAME=FOLDER",
                          "e.g. --adapter support=runs/support/adapter")
    return name, folder


def _fail(command: str, message: str, status: int) -> int:
    """One line on stderr (no traceback) and the exit status."""
    print(f"deltatune {command}: " + " ".join(message.split("\n")), file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deltatune`` command; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser, subcommands = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, which knows the options to suggest
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "serve":
            return run_serve(args)
        return run_train(args) if args.command == "train" else run_other(args)
    except TrainingError as error:
        if error.__cause__ is not None:  # raised from a failure around the run (a full disk), not by the training
            return _fail(args.command, f"error: {error}", 2)
        return _fail(args.command, f"training stopped: {error}", 1)
    except DeltatuneError as error:
        return _fail(args.command, f"error: {error}", 2)
    except OSError as error:  # the system refused a read or write (disk full, permissions)
        return _fail(args.command, f"error: {error}. Free disk space or fix the permissions, then run the command "
                     "again" + (" with --resume" if args.command == "train" else ""), 2)
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
