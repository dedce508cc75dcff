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
import json
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
    help_text = f.metadata["help"]
    if "default:" not in help_text:  # a help that names its own default (a computed one) says it once
        help_text += f" (default: {'none' if f.default in ('', ()) else repr(f.default)})"
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


RUN_FOLDER = "a run folder: train's --output-dir, whose run.json names the model, task and data"
SOURCE_HELP = {"eval": RUN_FOLDER, "predict": RUN_FOLDER,
               "merge": "a run folder (train's --output-dir) or an adapter folder",
               "inspect": "a run folder (train's --output-dir) or an adapter folder"}
"""What each command's ``source`` may be: eval and predict need a run's data and task, not just an adapter."""


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
        sub.add_argument("source", type=Path, help=SOURCE_HELP[name])
        sub.add_argument("--adapter", default="adapter", choices=("adapter", "best"),
                         help="in a run folder: the final adapter or the best evaluated one (default: adapter)")
        if name == "eval":
            sub.add_argument("--data", default="", help="data file (default: the run's evaluation data)")
            sub.add_argument("--split", default="", help="the split to evaluate: a split of a saved DatasetDict, "
                             "else the value of the run's split column (default: the run's evaluation split)")
            sub.add_argument("--max-rows", type=int, default=0, help="at most this many rows; 0 = all")
            sub.add_argument("--report", action="store_true", help="classification runs: also print per-class "
                             "precision, recall, F1 and the confusion matrix")
        if name == "predict":
            sub.add_argument("--text", action="append", default=[], help="an input text (repeatable)")
            sub.add_argument("--file", default="", help="a data file (or datasets folder) whose rows to predict")
            sub.add_argument("--split", default="", help="with --file: predict one split, a split of a saved "
                             "DatasetDict or the value of the run's split column (default: every row)")
            sub.add_argument("--include-input", action="store_true", help="repeat each input row in its output line")
        if name in ("eval", "predict"):
            sub.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default "
                             "(see docs/training.md on loaded machines)")
        if name in ("merge", "inspect"):
            sub.add_argument("--model", default="", help="base model folder (default: the one the adapter names)")
        if name == "merge":
            sub.add_argument("--output", type=Path, required=True, help="folder for the merged model")
    add_spectrum_options(subcommands["inspect"])
    subcommands["serve"] = add_serve(commands)
    subcommands["sweep"] = add_sweep(commands)
    return parser, subcommands


def add_sweep(commands: Any) -> Parser:
    """``deltatune sweep``: a grid of runs x seeds from a YAML file, and its report (docs/experiments.md)."""
    text = "run a grid of training runs x seeds from a YAML file (resumable), or write its report"
    sub: Parser = commands.add_parser("sweep", help=text, description=text + ". `deltatune sweep SWEEP.yaml` runs "
                                      "(finished runs are skipped, failed ones retried); `deltatune sweep report "
                                      "RESULTS.jsonl` writes markdown tables and plots from the results alone.")
    sub.add_argument("paths", nargs="+", metavar="PATH", help="a sweep YAML file, or the word report and one "
                     "results JSONL file or more (one table over sweeps that share cells)")
    sub.add_argument("--in-process", action="store_true", help="run every run in this process instead of one "
                     "process each (faster to start; the memory column is then this process's peak so far)")
    sub.add_argument("--report", action="store_true", help="after the sweep, write its report too")
    sub.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1; "
                     "with threads: 1 in the sweep's base, up to the number of cores, memory allowing)")
    sub.add_argument("--rerun", nargs="+", default=(), metavar="CELL", help="run these cells again at every seed "
                     "though finished (e.g. after a fix); their new results lines supersede the old ones")
    sub.add_argument("--output", type=Path, help="report file (default: the results file with .md; plots in <report>_plots/)")
    sub.add_argument("--columns", nargs="*", help="metric or result fields to tabulate (default: every metric, "
                     "train_loss, trainable_percent, peak_rss_mib, train_seconds, tokens_per_second)")
    sub.add_argument("--plot-x", nargs="*", help="options to plot the metrics against (default: every numeric "
                     "option the cells set)")
    sub.add_argument("--cells", nargs="*", help="only these cells, in this order (names as the table prints them, "
                     "e.g. r=8 or lr=0.001,r=16)")
    sub.add_argument("--no-plots", action="store_true", help="tables only (plots need the plot extra: matplotlib)")
    return sub


def _report_command(results: list[Path], args: argparse.Namespace) -> str:
    """The ``deltatune sweep report`` command line that writes this report again (quoted in it)."""
    words = ["deltatune sweep report", *(p.as_posix() for p in results)]
    if args.output:
        words.append(f"--output {args.output.as_posix()}")
    for flag, values in (("--columns", args.columns), ("--plot-x", args.plot_x), ("--cells", args.cells)):
        if values is not None:
            words.append(" ".join([flag, *values]))
    return " ".join(words + (["--no-plots"] if args.no_plots else []))


def run_sweep_command(args: argparse.Namespace) -> int:
    from .sweep import read_spec, run_sweep, write_report

    paths = list(args.paths)
    if paths[0] == "report":
        if len(paths) < 2:
            raise ConfigError("deltatune sweep report", "paths", paths[1:], "takes one results file or more",
                              "e.g. deltatune sweep report runs/sweeps/rank/results.jsonl")
        if args.rerun or args.jobs != 1:
            raise ConfigError("deltatune sweep report", "--rerun" if args.rerun else "--jobs",
                              args.rerun or args.jobs, "is about running a sweep, and a report runs nothing",
                              "pass it to deltatune sweep SWEEP.yaml")
        if len(paths) > 2 and not args.output:
            raise ConfigError("deltatune sweep report", "--output", None, "several results files make one report, "
                              "which has no default name", "pass --output REPORT.md")
        results = [Path(p) for p in paths[1:]]
    elif len(paths) == 1:
        spec = read_spec(Path(paths[0]))
        written = run_sweep(spec, in_process=args.in_process, rerun=args.rerun, jobs=args.jobs)
        failed = sum(1 for r in written if r["status"] != "ok")
        print(f"sweep done: {len(written)} runs this time, {failed} failed; results in {spec.results}")
        if not args.report:
            return 1 if failed else 0
        results = [spec.results]
    else:
        raise ConfigError("deltatune sweep", "paths", paths, "takes one sweep file, or `report` and a results file",
                          "e.g. deltatune sweep experiments/rank_ablation_minilm.yaml")
    command = _report_command(results, args)
    report, plots = write_report(results, args.output, args.columns, args.plot_x, not args.no_plots, command,
                                 args.cells)
    print(f"report written to {report}" + (f" with {len(plots)} plot(s)" if plots else ""))
    return 0


def add_spectrum_options(sub: Parser) -> None:
    """``deltatune inspect --spectrum``: the ΔW singular-value analysis (docs/analysis.md)."""
    sub.epilog = ("Columns of the ΔW table: rel = ||ΔW|| / ||W|| (the change against the frozen weight); eff.rank = "
                  "exp(entropy of the normalised singular values), how many directions ΔW spreads over; rank = "
                  "singular values above max(shape)·eps·σ_max. --spectrum adds Ek (share of ||ΔW||² in the top k "
                  "singular values) and amp (||ΔW|| / ||U^T W V||, Hu et al. 2021 section 7.3).")
    sub.add_argument("--spectrum", action="store_true", help="also print every layer's ΔW spectrum: energy of the "
                     "top k singular values, amplification of W's directions (implied by --json/--plot/--compare)")
    sub.add_argument("--json", type=Path, help="write the spectrum (and phi) as JSON (schema in docs/analysis.md)")
    sub.add_argument("--plot", type=Path, help="write plots (an image, e.g. OUT.png; needs the plot extra)")
    sub.add_argument("--compare", type=Path, help="another run or adapter folder: the subspace similarity phi "
                     "between the two adapters' ΔW, per layer")
    sub.add_argument("--side", default="right", choices=("right", "left"), help="phi on ΔW's right singular vectors "
                     "(input subspace, as the paper) or left ones (output subspace) (default: right)")
    sub.add_argument("--energy-k", type=int, action="append", default=[], metavar="K",
                     help="also report the energy of the top K singular values (repeatable; 1 2 4 8 16 always)")


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
    """Options from a YAML mapping; keys may use - or _.

    An unknown key is refused naming the file and the closest option. A float option also takes
    a string that reads as a number: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string.
    """
    import yaml

    from .train.options import option_table

    where = f"deltatune train --config {path}"
    if not path.is_file():
        raise ConfigError("deltatune train", "config", str(path), "no such file", "pass an existing YAML file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(where, "config", str(path), "is not a YAML mapping", "write `option: value` lines")
    kinds = {f.name: str(f.type) for _, f in option_table()}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in kinds:
            close = difflib.get_close_matches(name, kinds, n=1)
            raise ConfigError(where, str(key), value, "is not an option",
                              f"did you mean {close[0]}?" if close else "see `deltatune train --help` for the options")
        values[name] = _as_float(value) if kinds[name] == "float" else value
    return values


def _as_float(value: Any) -> Any:
    """``value`` as a float when it is a string that reads as one (``"1e-3"``); else unchanged, for the type check."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
    from .train.report import format_report

    if args.command == "eval":
        metrics = commands.evaluate_run(args.source, args.data, args.split, args.adapter, args.max_rows, args.threads,
                                        args.report)
        report = metrics.pop("report", None)
        print(commands.to_json(metrics))
        if report is not None:
            print(format_report(report))
    elif args.command == "predict":
        rows = _predict_rows(args)
        for row, result in zip(rows, commands.predict_run(args.source, rows, args.adapter, args.threads), strict=True):
            print(json.dumps({**result, **({"input": row} if args.include_input else {})}, default=str))
    elif args.command == "merge":
        out = commands.merge_to_folder(args.source, args.output, args.model, args.adapter)
        print(f"merged model written to {out}; load it with transformers' from_pretrained")
    else:
        report = commands.inspect_adapter(args.source, args.model)
        layers = report.pop("layers")
        print(commands.to_json(report))
        print(commands.format_layers(layers))
        if args.spectrum or args.json or args.plot or args.compare:
            from .spectrum import ENERGY_KS
            from .spectrum_report import inspect_spectrum

            print(inspect_spectrum(args.source, args.model, args.compare, args.side, (*ENERGY_KS, *args.energy_k),
                                   args.json, args.plot))
    return 0


def _predict_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .train import commands

    if args.file:
        return commands.rows_to_predict(args.source, args.file, args.split).rows
    if args.split:
        raise ConfigError("deltatune predict", "split", args.split, "it chooses rows of --file, and no --file was "
                          "given", "pass --file FILE --split NAME, or drop --split")
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
        if args.command == "sweep":
            return run_sweep_command(args)
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
