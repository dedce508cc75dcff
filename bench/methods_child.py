"""One measurement of methods_step.py: one method attached as `deltatune train` attaches it, its steps timed.

Why a child of its own (not child.py's ``Spec``): child.py attaches LoRA through ``dt.attach`` with the
benchmark's own options; here every method of a sweep file must be attached exactly as ``deltatune train``
would attach it for that sweep cell, so the child goes through the trainer's own functions (``split_options``,
the task's ``load_model``, ``adapter_config`` -> the method's registered recipe, ``attach_trained``,
``training_hooks``, ``param_groups_for``, ``make_optimizer``): the same r, alpha, virtual tokens, targets,
head and pooler trained in full, optimizer groups (LoRA+) and per-step hooks (AdaLoRA) as the sweep's runs.

A measurement (``MSpec``):

variant   a label (e.g. ``lora``, ``prefix-tuning``) or ``floor``
options   the flat `deltatune train` options of the sweep cell (``base`` + the cell, seed 0); for ``floor``
          the reference cell's (its learning rate and weight decay)
floor     no method: every base parameter frozen, the head and pooler trained (what the trainer trains in
          full next to any method), and the embeddings' output made to require grad, so backward runs
          through every layer down to the input (what a method on layer 0 or on the input must pay; a
          method whose lowest site is higher up, e.g. Pfeiffer after layer 0's FFN, needs a little less)
quick     a tiny random BERT (2 layers, hidden 32) saved with MiniLM's tokenizer, instead of all-MiniLM-L6-v2

One step, as the trainer's step without its method-independent bookkeeping (gradient clipping, the
divergence checks, the schedule): the loss the trainer computes (``full_loss``: the task's loss plus the
method's loss terms, AdaLoRA's orthogonality, plus what the model's training signals recorded, MixLoRA's
load balancing), backward, AdamW step, the method's per-step callbacks (AdaLoRA's importance update), then
``zero_grad(set_to_none=True)``. The batch is fixed: the ``batch`` longest training rows of the sweep's data
(the shipped sentiment extract), truncated at ``seq_len`` tokens and collated as the trainer collates them.

    python bench/methods_child.py --spec '{"variant": "lora", "options": {"method": "lora", "r": 8}}' --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from child import check_grads, import_deltatune
from harness import SkipVariant, display_path, guarded, minor_faults, rss_mb, time_calls
from models import SEED, minilm_dir

FLOOR = "floor"
NOT_TRAINER_OPTIONS = ("output_dir", "threads")  # the sweep's run folder (nothing is written here); the
# torch threads are the benchmark's own --threads, which the trainer's setup would otherwise override


@dataclass(frozen=True)
class MSpec:
    """What one child measures (see the module docstring)."""

    variant: str = "lora"
    options: Mapping[str, Any] = field(default_factory=dict)
    batch: int = 16
    seq_len: int = 64
    quick: bool = False


# ---------------------------------------------------------------------------- model


def tiny_bert_folder(folder: Path) -> str:
    """A tiny random BERT (2 layers, hidden 32) saved with MiniLM's tokenizer: the --quick model.
    Drawn from a fixed seed, so every child of a quick run builds the same one."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def trainer_options(spec: MSpec, model_path: str | None) -> dict[str, Any]:
    """The cell's flat options, at seed 0, truncating at ``seq_len`` tokens, on the CPU, on the given model."""
    options = {k: v for k, v in spec.options.items() if k not in NOT_TRAINER_OPTIONS}
    options.update(seed=0, max_length=spec.seq_len, device="cpu")
    if model_path is not None:
        options["model"] = model_path
    return options


def fixed_batch(task: Any, features: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """The ``batch`` longest features (ties: the earlier row), collated by the task as the trainer collates
    them (padded to the longest: ``seq_len`` tokens once the rows reach the truncation): the same batch in
    every child, made of the run's own tokenized rows (a causal LM's label lists padded as its task pads them)."""
    longest = sorted(range(len(features)), key=lambda i: (-len(features[i]["input_ids"]), i))[:batch]
    return dict(task.collate([features[i] for i in sorted(longest)]))


@dataclass
class Prepared:
    """A model ready to train, with what one of its steps needs."""

    model: Any
    task: Any
    batch: dict[str, Any]
    optimizer: Any | None
    """None for a floor that trains nothing (a causal LM has no new head): its step is forward and backward."""
    callbacks: list[Callable[[int], None]]
    loss_terms: list[Callable[[], Any]]
    signals: list[Any]
    method: str


def prepare(spec: MSpec, model_path: str | None) -> Prepared:
    """Data, task, model and method as `deltatune train` prepares them (train/run.py's ``_train_run``)."""
    from deltatune.hf import load_tokenizer
    from deltatune.registry import param_groups_for, training_hooks
    from deltatune.train.batches import planned_steps
    from deltatune.train.options import default_model_dir, split_options
    from deltatune.train.prepare import apply_memory_options, make_optimizer
    from deltatune.train.run import (adapter_config, attach_trained, load_base, load_data, load_prior,
                                     prepare_base, setup_device)
    from deltatune.train.signals import find_signals
    from deltatune.train.tasks import task_class
    from deltatune.train.trainer import seed_everything

    run, train = split_options(trainer_options(spec, model_path))
    device = setup_device(run)
    seed_everything(train.seed)
    path = run.model or default_model_dir()
    train_rows, _ = load_data(run)
    task = task_class(run.task)(load_tokenizer(path), run.max_length, run.column_map())
    train_rows = task.usable(train_rows, run.skip_bad_rows)
    task.fit(train_rows)
    features = task.encode(train_rows)
    model = prepare_base(run, task, load_base(task, path, device, False))
    callbacks: list[Callable[[int], None]] = []
    loss_terms: list[Callable[[], Any]] = []
    groups = None
    if spec.variant == FLOOR:
        floor(model, task)
    else:
        load_prior(run, model)
        attach_trained(model, adapter_config(run, task, model, planned_steps(len(features), train)))
        callbacks, loss_terms = training_hooks(run.method, model)
        groups = param_groups_for(run.method, run.method_options)
    apply_memory_options(model, train)
    model.train()
    trains = any(q.requires_grad for q in model.parameters())
    optimizer = make_optimizer(model, train, groups) if trains else None
    batch = fixed_batch(task, features, spec.batch)
    return Prepared(model, task, batch, optimizer, list(callbacks), list(loss_terms), find_signals(model),
                    FLOOR if spec.variant == FLOOR else run.method)


def floor(model: Any, task: Any) -> None:
    """Freeze the base; train the task's new head and the pooler as the trainer trains them next to any method
    (none for a causal LM, whose output head is the pretrained, often tied, one); make the embeddings' output
    require grad so that backward runs down to the input."""
    from deltatune.config import TASK_HEADS

    for p in model.parameters():
        p.requires_grad_(False)
    heads = [name for name in TASK_HEADS.get(task.task_type, ()) if hasattr(model, name)]
    for name in (*task.saved_modules(model), *heads):
        model.get_submodule(name).requires_grad_(True)
    model.enable_input_require_grads()


# ------------------------------------------------------------------------ measuring


def step_function(p: Prepared, cpu_times: list[float]) -> Callable[[], float]:
    """One training step (see the module docstring); each call's thread CPU time goes to ``cpu_times``
    (one torch thread runs its kernels on this thread, so this is the step's compute without the time
    spent waiting for a core on a loaded machine)."""
    from deltatune.train.signals import full_loss

    done = [0]

    def step() -> float:
        start = time.thread_time()
        loss = full_loss(lambda: p.task.loss(p.model, p.batch), p.loss_terms, p.signals)
        loss.backward()
        if p.optimizer is not None:
            p.optimizer.step()
        done[0] += 1
        for callback in p.callbacks:
            callback(done[0])
        if p.optimizer is not None:
            p.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        cpu_times.append(time.thread_time() - start)
        return value

    return step


def measure(spec: MSpec, steps: int, warmup: int) -> dict[str, Any]:
    """Setup (timed and RSS-tracked by phase), one checking pass, warm-up, then the timed steps."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    dt = import_deltatune()  # this checkout's src/ first
    if isinstance(dt, str):
        raise SkipVariant(dt)
    rss_import = rss_mb()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        p = prepare(spec, tiny_bert_folder(Path(folder)) if spec.quick else None)
        setup_s, rss_setup = time.perf_counter() - t0, rss_mb()
    params = [q for q in p.model.parameters() if q.requires_grad]
    torch.manual_seed(SEED + 2)  # the same dropout masks in every variant
    missing = check_grads(p.model, p.batch)
    cpu_times: list[float] = []
    step = step_function(p, cpu_times)
    losses = [step() for _ in range(warmup)]
    faults_before = minor_faults()
    del cpu_times[:]
    timing, timed = time_calls(step, steps)
    losses += timed
    return {
        "variant": spec.variant, "method": p.method, "spec": asdict(spec),
        "step_s_median": statistics.median(timing.times), "step_s": timing.times,
        "cpu_step_s_median": statistics.median(cpu_times), "cpu_step_s": list(cpu_times),
        "peak_rss_mb": rss_mb(), "rss_after_import_mb": rss_import, "rss_after_setup_mb": rss_setup,
        "setup_s": setup_s, "minor_faults_per_step": (minor_faults() - faults_before) / max(steps, 1),
        "trainable": sum(q.numel() for q in params), "total": sum(q.numel() for q in p.model.parameters()),
        "trainable_without_grad": missing, "optimizer_groups": len(p.optimizer.param_groups) if p.optimizer else 0,
        "callbacks": len(p.callbacks), "loss_terms": len(p.loss_terms), "signals": len(p.signals),
        "batch_shape": list(p.batch["input_ids"].shape),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "cpu_per_wall": timing.cpu_per_wall, "other_cpu_frac": timing.other_cpu_frac,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(p.model.config, "_attn_implementation", None),
        "deltatune_file": display_path(Path(dt.__file__)) if dt.__file__ else None,
    }


def run(spec: MSpec, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """measure() with the thread count set; a skip or an error becomes a result of its own."""
    import torch

    torch.set_num_threads(threads)
    return guarded(lambda: measure(spec, steps, warmup), spec)


def main(argv: list[str] | None = None) -> int:
    """Measure one --spec; print its JSON line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--spec", required=True, type=json.loads, help="an MSpec as a JSON object")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps after the checking pass")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    print(json.dumps(run(MSpec(**args.spec), args.steps, args.warmup, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
