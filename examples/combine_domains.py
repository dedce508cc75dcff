"""Adapter arithmetic on two real runs: combine a LoRA trained on one domain with one trained on others.

Takes two finished ``deltatune train --method lora`` runs of the same model and task (for the
example in docs/combining.md: MiniLM on the movie-review rows of the shipped sentiment data, and
on its other domains), loads both adapters into one model and, for each ``dt.combine`` method,
creates the combined adapter and measures its accuracy on each domain's test rows and on all of
them; the two members alone are measured the same way. Prints a Markdown table (and writes the
numbers as JSON with ``--json``). The measured table and the commands that made it are in
docs/combining.md, "Real example".

The task head. Each run trains its own classifier head (with BERT's pooler): ``modules_to_save``,
whole trained copies that ``dt.combine`` cannot average and refuses to combine (two adapters may
not each hold a copy of one module). So only the low-rank parts are combined, and the head comes
from one member: the other member is loaded a second time *without* its head (its LoRA factors
only, ``lora_only``), and the combination ``{A: w_a, B-without-head: w_b}`` keeps A's head. Every
combination is measured twice, once with each member's head, since neither head is the natural
one for a mixed adapter.

Accuracy is the task's own metric (``Task.evaluate``, the path ``deltatune eval`` takes); the
accuracy on all rows is the two domains' correct predictions over their total rows.

Usage (from the project root; RUN_A, RUN_B are ``--output-dir`` folders of ``deltatune train``)::

    python examples/combine_domains.py runs/combine/movies runs/combine/other
    python examples/combine_domains.py RUN_A RUN_B --data FILE --split test \\
        --domain-column domain --domain movieReviewSnippets --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from deltatune.train.data import Rows, read_rows, split_rows  # noqa: E402
from deltatune.train.options import RunOptions, default_data_file  # noqa: E402
from deltatune.train.run import TRAINED, read_run_file, rebuild  # noqa: E402
from deltatune.train.tasks.base import Features, Task  # noqa: E402

EVAL_BATCH = 64
"""The batch size ``deltatune eval`` evaluates with."""
OTHER = "other"
"""The name of the group of rows outside ``--domain``."""


@dataclass(frozen=True)
class Combo:
    """One ``dt.combine`` call: the method, the weights of the two members (A's, B's) and its options."""

    method: str
    weights: tuple[float, float]
    density: float | None = None
    weighting: str | None = None

    @property
    def label(self) -> str:
        options = [f"density {self.density:g}"] if self.density is not None else []
        options += [f"{self.weighting} weighting"] if self.weighting else []
        return self.method + (f" ({', '.join(options)})" if options else "")


COMBOS: tuple[Combo, ...] = (
    # A weighted mean of the two changes: weights 0.5 / 0.5 where the method sums the weighted tensors.
    Combo("linear", (0.5, 0.5)),
    Combo("cat", (0.5, 0.5)),
    Combo("svd", (0.5, 0.5)),
    Combo("dare_linear", (0.5, 0.5), density=0.5),
    Combo("magnitude_prune", (0.5, 0.5), density=0.5),
    # TIES averages the entries that agree with the elected sign itself (a disjoint mean), so its
    # mean-like weights are 1 / 1; with 0.5 / 0.5 it would halve the change.
    Combo("ties", (1.0, 1.0), density=0.5),
    Combo("ties_svd", (1.0, 1.0), density=0.5),
    Combo("dare_ties", (1.0, 1.0), density=0.5),
    # Inverse-norm weighting with weights 1 / 1: per layer λ_i ∝ 1/‖ΔW_i‖ with λ_1 + λ_2 = 1.
    Combo("cat", (1.0, 1.0), weighting="inverse_norm"),
    # Task arithmetic's plain sum of the two changes, for scale.
    Combo("cat", (1.0, 1.0)),
)


@dataclass(frozen=True)
class Result:
    """Accuracy of one adapter (a member, or a combination with one member's head) per group of rows."""

    adapter: str
    weights: str
    head: str
    accuracy: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class Group:
    """The encoded test rows of one domain group."""

    name: str
    features: list[Features]


def lora_only(adapter_dir: Path, out_dir: Path) -> Path:
    """A copy of the LoRA adapter in ``adapter_dir`` without its whole-module copies (the task head):
    only its ``lora_*`` tensors, and a config with no ``modules_to_save`` and no task type (a task type
    brings its head along). Returns ``out_dir``."""
    config = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise SystemExit(f"{adapter_dir}: a {config.get('peft_type')} adapter; this example combines LoRA runs")
    config.update(modules_to_save=None, task_type=None)
    tensors = {k: v for k, v in load_file(adapter_dir / WEIGHTS_NAME).items() if ".lora_" in k}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    return out_dir


def check_same_base(run_a: Path, run_b: Path) -> None:
    """Both runs must share the model, the task and its label set, or their adapters do not combine."""
    a, b = (read_run_file(run) for run in (run_a, run_b))
    for what, first, second in (("model", a["model"], b["model"]), ("labels", a["task_state"], b["task_state"]),
                                *((key, a["options"].get(key), b["options"].get(key)) for key in ("task", "method"))):
        if first != second:
            raise SystemExit(f"{run_a} and {run_b} differ in {what}: {first!r} vs {second!r}")


def load_members(run_a: Path, run_b: Path, names: tuple[str, str], scratch: Path) -> tuple[nn.Module, Task, RunOptions]:
    """The runs' model (rebuilt as ``deltatune eval`` rebuilds it), holding each member whole under its
    name and once more as ``NAME-lora`` (LoRA factors only, no head)."""
    check_same_base(run_a, run_b)
    model, task, run = rebuild(run_a)
    dt.delete_adapter(model, TRAINED)  # reloaded below under the member's name
    for name, run_dir in zip(names, (run_a, run_b), strict=True):
        dt.load(model, run_dir / "adapter", name)
        dt.load(model, lora_only(run_dir / "adapter", scratch / name), f"{name}-lora")
    return model, task, run


def domain_groups(task: Task, run: RunOptions, data: str, split: str, domain_column: str, domain: str) -> list[Group]:
    """The ``split`` rows of ``data``, in two groups: those whose ``domain_column`` is ``domain``, and the rest."""
    rows = task.usable(split_rows(read_rows(data, run.skip_bad_rows), run.split_column, split), run.skip_bad_rows)
    inside = [i for i, r in enumerate(rows.rows) if str(r.get(domain_column)) == domain]
    outside = [i for i, r in enumerate(rows.rows) if str(r.get(domain_column)) != domain]
    groups = [Group(name, task.encode(rows.subset(chosen))) for name, chosen in ((domain, inside), (OTHER, outside))]
    empty = [g.name for g in groups if not g.features]
    if empty:
        found = sorted({str(r.get(domain_column)) for r in rows.rows})
        raise SystemExit(f"{data} [{split}]: no rows in group(s) {empty} ({domain_column} values: {found})")
    return groups


def measure(model: nn.Module, task: Task, groups: list[Group]) -> tuple[dict[str, float], float]:
    """Accuracy per group and on all of them, with the active adapter; and the seconds it took."""
    start = time.perf_counter()
    accuracy = {g.name: task.evaluate(model, g.features, EVAL_BATCH)["accuracy"] for g in groups}
    total = sum(len(g.features) for g in groups)
    accuracy["all"] = sum(accuracy[g.name] * len(g.features) for g in groups) / total
    return accuracy, time.perf_counter() - start


def combined(model: nn.Module, combo: Combo, head: str, rest: str, weights: dict[str, float], seed: int) -> str:
    """Add the ``combo`` of member ``head`` (whole, with its head; first) and member ``rest`` (LoRA only)."""
    name = f"mix-{head}"
    dt.combine(model, {head: weights[head], f"{rest}-lora": weights[rest]}, combo.method, name=name,
               density=combo.density, weighting=combo.weighting,
               generator=seed if combo.method.startswith("dare") else None)
    return name


def evaluate_all(run_a: Path, run_b: Path, data: str, split: str, domain_column: str, domain: str,
                 combos: Sequence[Combo], seed: int, say: Callable[[str], None] = print
                 ) -> tuple[list[Result], dict[str, int]]:
    """The members alone, then every combination with each member's head, measured on the test groups;
    the results and the number of rows in each group."""
    names = (run_a.resolve().name, run_b.resolve().name)
    if names[0] == names[1]:
        names = (f"A-{names[0]}", f"B-{names[1]}")
    with tempfile.TemporaryDirectory() as scratch:
        model, task, run = load_members(run_a, run_b, names, Path(scratch))
    groups = domain_groups(task, run, data, split, domain_column, domain)
    sizes = {g.name: len(g.features) for g in groups}
    say(table([], sizes))
    results = []
    for member in names:
        dt.set_active(model, member)
        accuracy, seconds = measure(model, task, groups)
        results.append(Result(f"{member} alone", "-", member, accuracy, seconds))
        say(row(results[-1], sizes))
    for combo in combos:
        weights = dict(zip(names, combo.weights, strict=True))
        for head, rest in (names, names[::-1]):
            name = combined(model, combo, head, rest, weights, seed)
            dt.set_active(model, name)
            accuracy, seconds = measure(model, task, groups)
            dt.delete_adapter(model, name)
            results.append(Result(combo.label, " / ".join(f"{w:g}" for w in combo.weights), head, accuracy, seconds))
            say(row(results[-1], sizes))
    return results, sizes


def row(result: Result, sizes: dict[str, int]) -> str:
    """One Markdown table row."""
    cells = [result.adapter, result.weights, result.head, *(f"{result.accuracy[g]:.3f}" for g in sizes),
             f"{result.accuracy['all']:.3f}"]
    return "| " + " | ".join(cells) + " |"


def table(results: list[Result], sizes: dict[str, int]) -> str:
    """The results as a Markdown table (only the header when there are none)."""
    header = ["adapter", "weights (A / B)", "head from", *(f"{g} ({n})" for g, n in sizes.items()),
              f"all ({sum(sizes.values())})"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(sizes) + 1)]
    return "\n".join([*lines, *(row(r, sizes) for r in results)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Combine the LoRA adapters of two deltatune runs with every "
                                     "dt.combine method and measure each result per domain.")
    parser.add_argument("run_a", type=Path, help="a finished `deltatune train --method lora` run (its --output-dir)")
    parser.add_argument("run_b", type=Path, help="a second run of the same model and task")
    parser.add_argument("--data", default="", help="evaluation data; default: the shipped sentiment extract")
    parser.add_argument("--split", default="test", help="the split to evaluate on (default: test)")
    parser.add_argument("--domain-column", default="domain", help="the column naming each row's domain")
    parser.add_argument("--domain", default="movieReviewSnippets",
                        help="the domain of RUN_A's rows; every other domain forms the group 'other'")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random draws")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, printing each row as it is measured; returns the exit status."""
    args = parse_args(argv)
    results, sizes = evaluate_all(args.run_a, args.run_b, args.data or default_data_file(), args.split,
                                  args.domain_column, args.domain, COMBOS, args.seed,
                                  say=lambda line: print(line, flush=True))
    if args.json is not None:
        record = {"sizes": sizes, "seed": args.seed, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
