"""One benchmark measurement: build a model, apply one variant, time its steps, print JSON.

Why a child process: peak RSS (``ru_maxrss``) only ever grows, so a variant's peak memory is its
own only in a fresh interpreter. The parents (``suite.py``, ``lora_step.py``) start one child
per measurement and read the JSON line it prints. A measurement is described by a ``Spec``:

arch      llama | gpt2 | minilm (see models.py)
variant   floor / base      the stock model with every parameter frozen ("floor" when training:
                            forward + backward down to the input embeddings, no optimizer: the
                            cost no adapter library can avoid; "base" for inference)
          peft              ``peft.get_peft_model(model, peft.LoraConfig(...))``
          deltatune         ``dt.attach(model, dt.LoraConfig(...), name="default")``
          deltatune-fast    the same, then ``dt.accelerate(model)`` (opt-in fused frozen-base
                            kernels); skipped where deltatune has no ``accelerate``
          deltatune-qlora   NF4 double-quantized base (``dt.quantize``), then the same LoRA
          peft-qlora        the same base quantized by bitsandbytes the way users do it (saved,
                            reloaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double
                            quant, fp32 compute)``), ``prepare_model_for_kbit_training``, then
                            peft's LoRA; skipped where bitsandbytes is not installed
          deltatune-merged  the same LoRA, then ``dt.merge(model)`` (inference only)
          bound-matmuls     the step's matrix products alone, preallocated (bounds.py)
          bound-floor-lora  the floor's step plus the low-rank products and AdamW alone (infer:
                            the base's forward plus the forward low-rank products)
mode      train     forward, loss, backward, AdamW step, zero_grad
          train-gc  the same with gradient checkpointing (non-reentrant), enabled on the base
                    model (with ``enable_input_require_grads``) before the adapter is attached
          infer     forward only, under ``torch.inference_mode()``, no labels; LoRA B is random
                    (``init_lora_weights=False``) so the adapter path does real work
seq_len   tokens per sequence (default: the arch's; sweeps change it)
malloc    default | retain: the child runs with glibc keeping freed memory mapped (the
          environment ``harness.MALLOC_RETAIN_ENV``, what ``dt.retain_freed_memory()`` sets), the
          same for every variant so that the comparison stays fair
dtype     the base model's dtype (default float32; bfloat16: both libraries keep the adapter
          in fp32, their default for half-precision models)
rank      LoRA r (alpha = 2 r: 16/32 by default); dora: ``use_dora=True``

    python bench/child.py --spec '{"arch": "gpt2", "variant": "peft"}' --steps 6 --warmup 2

Several ``--spec`` run one after the other in this one process (what ``suite.py --quick``
does to save interpreter start-ups; their peak RSS is then cumulative, not their own).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from bounds import BOUND_VARIANTS, bound_step
from harness import (MALLOC_RETAIN_ENV, REPO_ROOT, SkipVariant, display_path, guarded, minor_faults, rss_mb,
                     time_calls)
from models import ARCHS, SEED, Shape, build_model, make_inputs, shape_for

NUM_THREADS = 2
LR = 1e-4
LORA_KWARGS: dict[str, Any] = dict(
    r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"
)
# The adapter library behind each variant (None: no adapter).
LIBRARY: dict[str, str | None] = {
    "floor": None, "base": None, "peft": "peft", "peft-qlora": "peft", "deltatune": "deltatune",
    "deltatune-fast": "deltatune", "deltatune-qlora": "deltatune", "deltatune-merged": "deltatune",
    "bound-matmuls": None, "bound-floor-lora": None,
}
MODES: tuple[str, ...] = ("train", "train-gc", "infer")
MALLOCS: tuple[str, ...] = ("default", "retain")
INFER_ONLY = frozenset({"base", "deltatune-merged"})
TRAIN_ONLY = frozenset({"floor", "bound-matmuls"})


@dataclass(frozen=True)
class Spec:
    """What one child measures (see the module docstring)."""

    arch: str = "llama"
    variant: str = "deltatune"
    mode: str = "train"
    seq_len: int | None = None  # None: the arch's default
    rank: int = 16
    dora: bool = False
    quick: bool = False  # the tiny shapes of models.SHAPES
    dtype: str = "float32"  # the base model's dtype; adapters stay fp32 under a 16-bit base
    malloc: str = "default"  # 'retain': run under MALLOC_RETAIN_ENV (the parent sets it)

    @property
    def training(self) -> bool:
        """Whether steps run backward (train, train-gc) or forward only (infer)."""
        return self.mode != "infer"

    def validate(self) -> None:
        """Refuse combinations that mean nothing, before any model is built."""
        if self.arch not in ARCHS or self.variant not in LIBRARY or self.mode not in MODES:
            raise ValueError(f"unknown arch/variant/mode in {self}; choose from {ARCHS}, "
                             f"{tuple(LIBRARY)}, {MODES}")
        if self.variant in INFER_ONLY and self.training:
            raise ValueError(f"variant {self.variant!r} is for mode 'infer'")
        if self.variant in TRAIN_ONLY and not self.training:
            raise ValueError(f"variant {self.variant!r} is for training; use 'base' with 'infer'")
        if self.malloc not in MALLOCS:
            raise ValueError(f"unknown malloc {self.malloc!r}; choose from {MALLOCS}")
        if (self.malloc == "retain") != all(os.environ.get(k) == v for k, v in MALLOC_RETAIN_ENV.items()):
            raise ValueError(f"malloc {self.malloc!r} needs this process's environment to "
                             f"{'have' if self.malloc == 'retain' else 'lack'} {MALLOC_RETAIN_ENV}")


def adapter_kwargs(spec: Spec) -> dict[str, Any]:
    """The LoraConfig arguments, identical for peft and deltatune."""
    kwargs: dict[str, Any] = {**LORA_KWARGS, "r": spec.rank, "lora_alpha": 2 * spec.rank}
    if spec.dora:
        kwargs["use_dora"] = True
    if not spec.training:
        kwargs["init_lora_weights"] = False  # random B: the unmerged path must not add zeros
    if spec.arch == "minilm":
        kwargs["exclude_modules"] = ["classifier"]  # a fresh head; peft's all-linear keeps it
    return kwargs


# ------------------------------------------------------------------------- libraries


def import_deltatune() -> ModuleType | str:
    """deltatune from this checkout's src/ (else the installed one), or why it is unusable."""
    src = REPO_ROOT / "src"
    if (src / "deltatune" / "__init__.py").is_file() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    try:
        import deltatune as dt
    except Exception as exc:  # ImportError, or any error raised while importing
        return f"`import deltatune` failed: {type(exc).__name__}: {exc}"
    missing = [n for n in ("attach", "LoraConfig", "trainable_parameters") if not hasattr(dt, n)]
    if missing:
        return f"deltatune ({getattr(dt, '__file__', None)}) lacks {', '.join(missing)}"
    return dt


def import_library(variant: str) -> ModuleType | None:
    """The adapter library this variant uses (None without one); SkipVariant if unusable."""
    if LIBRARY[variant] is None:
        return None
    if LIBRARY[variant] == "peft":
        import peft

        if variant == "peft-qlora" and importlib.util.find_spec("bitsandbytes") is None:
            raise SkipVariant("peft-qlora needs bitsandbytes (not a dependency of deltatune: "
                              "run the suite from an environment that has it)")
        return peft
    dt = import_deltatune()
    if isinstance(dt, str):
        raise SkipVariant(dt)
    if variant == "deltatune-fast" and not hasattr(dt, "accelerate"):
        raise SkipVariant("this deltatune has no dt.accelerate (the opt-in fused frozen base)")
    return dt


def prepare(spec: Spec, lib: ModuleType | None, model: Any) -> tuple[Any, dict[str, Any]]:
    """Apply the variant to ``model``; return the model to run and the library's own facts."""
    if spec.mode == "train-gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if LIBRARY[spec.variant] is None:
        return freeze(model, spec.mode), {}
    if LIBRARY[spec.variant] == "peft":
        return attach_peft(lib, model, spec)
    return attach_deltatune(lib, model, spec)


def freeze(model: Any, mode: str) -> Any:
    """The floor: no trainable parameter, yet (when training) backward runs through every
    layer down to the embeddings, as it must under any adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "train":  # train-gc has done it already
        model.enable_input_require_grads()
    return model


def attach_peft(peft: Any, model: Any, spec: Spec) -> tuple[Any, dict[str, Any]]:
    """peft's LoRA (or DoRA) on ``model``, on a bitsandbytes 4-bit base for peft-qlora."""
    if spec.variant == "peft-qlora":
        model = peft.prepare_model_for_kbit_training(bnb_4bit_copy(model),
                                                     use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(**adapter_kwargs(spec)))
    trainable, total = model.get_nb_trainable_parameters()
    return model, {"lib_trainable": trainable, "lib_total": total, "lib_version": peft.__version__}


def bnb_4bit_copy(model: Any) -> Any:
    """``model`` saved and reloaded with bitsandbytes NF4 + double quantization, fp32 compute,
    the output head left dense (transformers' default), as a QLoRA user loads a model."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                    device_map="cpu", dtype=torch.float32)


def attach_deltatune(dt: Any, model: Any, spec: Spec) -> tuple[Any, dict[str, Any]]:
    """deltatune's LoRA (or DoRA) on ``model``, on a 4-bit base, accelerated or merged as the
    variant says."""
    if spec.variant == "deltatune-qlora":  # lm_head stays dense
        dt.quantize(model, dt.QuantConfig(quant_type="nf4", double_quant=True))
    model = dt.attach(model, dt.LoraConfig(**adapter_kwargs(spec)), name="default")
    trainable, total = dt.trainable_parameters(model)
    if spec.variant == "deltatune-fast":
        model = dt.accelerate(model)
    if spec.variant == "deltatune-merged":
        dt.merge(model)
    return model, {
        "lib_trainable": trainable,
        "lib_total": total,
        "lib_version": getattr(dt, "__version__", None),
        "lib_file": display_path(Path(dt.__file__)) if getattr(dt, "__file__", None) else None,
    }


# ---------------------------------------------------------------------------- steps


def train_step(model: Any, inputs: dict[str, Any], optimizer: Any | None) -> float:
    """One step: forward, loss, backward, AdamW, zero_grad; returns the loss."""
    loss = model(**inputs).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def infer_step(model: Any, inputs: dict[str, Any]) -> None:
    """One forward without autograd; the logits are dropped at once (no RSS kept)."""
    import torch

    with torch.inference_mode():
        model(**inputs)


def check_grads(model: Any, inputs: dict[str, Any]) -> int:
    """Run forward+backward once; return how many trainable params got no gradient."""
    model(**inputs).loss.backward()
    missing = sum(1 for p in model.parameters() if p.requires_grad and p.grad is None)
    model.zero_grad(set_to_none=True)
    return missing


def logits_abs_mean(model: Any, inputs: dict[str, Any]) -> float:
    """Mean |logit| of one forward: merged and unmerged deltatune must agree on it."""
    import torch

    with torch.inference_mode():
        return float(model(**inputs).logits.abs().mean())


# ------------------------------------------------------------------------ measuring


def run_spec(spec: Spec, steps: int, warmup: int, shape: Shape | None = None,
             threads: int = NUM_THREADS) -> dict[str, Any]:
    """Build, warm up and time one spec in this process; return its measurements, or
    ``{"skipped": why}`` when the variant cannot run here."""
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (every variant pays for it; keep it out of import_s)

    spec.validate()
    shape = shape or shape_for(spec.arch, spec.quick, spec.seq_len)
    try:
        return measure(spec, shape, steps, warmup)
    except SkipVariant as exc:
        return {"variant": spec.variant, "spec": asdict(spec), "skipped": str(exc)}


def measure(spec: Spec, shape: Shape, steps: int, warmup: int) -> dict[str, Any]:
    """The measurement proper: setup (timed and RSS-tracked by phase), then the steps."""
    import torch

    t0 = time.perf_counter()
    lib = import_library(spec.variant)
    import_s, rss_import = time.perf_counter() - t0, rss_mb()
    t0 = time.perf_counter()
    model = build_model(spec.arch, shape).to(getattr(torch, spec.dtype))
    rss_model = rss_mb()
    model, facts = prepare(spec, lib, model)
    model.train(spec.training)
    setup_s, rss_setup = time.perf_counter() - t0, rss_mb()

    params = [p for p in model.parameters() if p.requires_grad]
    adapted = LIBRARY[spec.variant] is not None
    optimizer = torch.optim.AdamW(params, lr=LR) if spec.training and adapted else None
    inputs = make_inputs(spec.arch, shape, with_labels=spec.training)
    torch.manual_seed(SEED + 2)  # the same dropout masks (GPT-2, MiniLM) in every variant
    step: Callable[[], float | None]
    if spec.training:  # one more untimed warm-up pass, that also checks the gradients
        missing, out_abs = check_grads(model, inputs), None
        step = partial(train_step, model, inputs, optimizer)
    else:
        missing, out_abs = None, logits_abs_mean(model, inputs)
        step = partial(infer_step, model, inputs)
    if spec.variant in BOUND_VARIANTS:
        step = bound_step(spec.variant, model, step, shape.batch * shape.seq_len, spec.rank,
                          spec.training)
    losses = [step() for _ in range(warmup)]
    faults_before = minor_faults()
    timing, timed = time_calls(step, steps)
    faults_per_step = (minor_faults() - faults_before) / max(steps, 1)
    losses += timed

    return {
        "variant": spec.variant,
        "spec": asdict(spec),
        "shape": asdict(shape),
        "use_dora": spec.dora,
        "step_s_median": statistics.median(timing.times),
        "step_s": timing.times,
        "peak_rss_mb": rss_mb(),
        "minor_faults_per_step": faults_per_step,
        "rss_after_import_mb": rss_import,
        "rss_after_model_mb": rss_model,
        "rss_after_setup_mb": rss_setup,
        "lib_import_s": import_s,
        "setup_s": setup_s,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "trainable_without_grad": missing,
        "loss_first": losses[0] if spec.training and losses else None,
        "loss_last": losses[-1] if spec.training and losses else None,
        "logits_abs_mean": out_abs,
        "cpu_per_wall": timing.cpu_per_wall,
        "other_cpu_frac": timing.other_cpu_frac,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        **facts,
    }


def run_guarded(spec: Spec, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """run_spec (which returns a skip itself), with an exception turned into ``{"error": traceback}``
    so that the other specs of a shared process still run."""
    return guarded(lambda: run_spec(spec, steps, warmup, threads=threads), spec)


def main(argv: list[str] | None = None) -> int:
    """Run each --spec in turn; print one JSON line per spec."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", action="append", required=True, type=json.loads,
                   help="a Spec as a JSON object (repeatable)")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--threads", type=int, default=NUM_THREADS,
                   help=f"torch threads (default {NUM_THREADS}, the benchmark's setting)")
    args = p.parse_args(argv)
    for fields in args.spec:
        res = run_guarded(Spec(**fields), args.steps, args.warmup, args.threads)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
