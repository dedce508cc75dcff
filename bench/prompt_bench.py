"""Prompt-space methods, side by side with peft: a training step and greedy generation.

What: issue 16's speed check of deltatune's prefix tuning and prompt tuning against peft's, on the
benchmark LLaMA of ``bench/models.py`` (fp32; the full shape is hidden 512, 8 layers, vocab 32000).
Why: the prompt methods are peft-exact in their outputs; this says whether they are also as fast.
Targets: a training step at most 0.95 of peft's time, generation at least peft's tokens per second.

How: one process, one base (each library gets a deepcopy of it), the same batch for every variant,
the same adapter values in both libraries, 20 virtual tokens each:

- ``prefix``: prefix tuning without the projection (P-tuning v2, the default), one training step
  (forward with labels, backward, AdamW step, zero_grad). The adapter is made by peft
  (``get_peft_model``), saved with ``save_pretrained`` and loaded by deltatune
  (``dt.load(..., trainable=True)``): peft refuses to load a prompt adapter trainable;
- ``prefix-proj``: the same with ``prefix_projection=True``. Its file holds the computed prefixes,
  not the MLP, so here both adapters are built right after the same torch seed instead (both
  libraries then draw the same initial values, as ``tests/test_prefix_peft.py`` relies on);
- ``prompt``: prompt tuning (random init), one training step, adapter made and saved by peft,
  loaded by deltatune;
- ``generate``: greedy ``generate`` with the cache and the ``prefix`` adapter (frozen, eval mode),
  ``--gen-batch`` rows of ``--prompt-len`` tokens, exactly ``--new-tokens`` new tokens each.

Before timing, the two libraries' outputs are compared (max abs difference of the training
forward's logits and loss; the generated tokens must be identical) and printed. Variants run
interleaved over ``--rounds`` rounds after a warm-up round; the table gives medians and each
variant's ours / peft time ratio (per round, then the median; for ``generate`` the ratio of tokens
per second, i.e. peft's time over ours). Results go to ``bench/results/prompt_bench.json``.

    .venv/bin/python bench/prompt_bench.py --rounds 5 --threads 1 [--quick] [--only generate]

Rounds alternate the order of the calls (as listed, then reversed), so neither library always runs
first or right after the other's heaviest call; each call's CPU time (``time.thread_time``) is kept
next to its wall time, since on a shared machine waiting for a core inflates the wall time only.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from models import build_llama, shape_for

TASK = "CAUSAL_LM"
SEED = 7
TRAIN_KINDS = ("prefix", "prefix-proj", "prompt")
TARGET_STEP = 0.95  # ours / peft seconds, at most
TARGET_GEN = 1.0  # ours / peft tokens per second, at least


def configs(kind: str, tokens: int) -> tuple[Any, Any]:
    """(deltatune's config, peft's) for ``kind``: the same fields in both."""
    import deltatune as dt
    import peft

    if kind == "prompt":
        kwargs: dict[str, Any] = {"task_type": TASK, "num_virtual_tokens": tokens}
        return dt.PromptTuningConfig(**kwargs), peft.PromptTuningConfig(**kwargs)
    kwargs = {"task_type": TASK, "num_virtual_tokens": tokens, "prefix_projection": kind == "prefix-proj"}
    return dt.PrefixTuningConfig(**kwargs), peft.PrefixTuningConfig(**kwargs)


def pair(base: Any, kind: str, tokens: int, trainable: bool) -> tuple[Any, Any]:
    """(deltatune's model, peft's) with the same ``kind`` adapter on copies of ``base``."""
    import deltatune as dt
    import peft

    ours_config, theirs_config = configs(kind, tokens)
    if kind == "prefix-proj":  # the file holds the MLP's output: build both from one seed instead
        torch.manual_seed(SEED)
        ours = dt.attach(copy.deepcopy(base), ours_config)
        torch.manual_seed(SEED)
        theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)
        return ours, theirs
    torch.manual_seed(SEED)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)  # peft loads prompt adapters frozen only
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = dt.load(copy.deepcopy(base), folder, trainable=trainable)
    if not trainable:
        theirs.requires_grad_(False)
    return ours, theirs


def train_step(model: Any, inputs: dict[str, Any]) -> Callable[[], Any]:
    """One AdamW step of ``model`` (train mode) on ``inputs``, as a no-argument call."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> Any:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def variants(base: Any, args: argparse.Namespace, train_inputs: dict[str, Any], gen_inputs: dict[str, Any]
             ) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """Every (variant, library) to time as a no-argument call, and the equality checks (made before
    any step changes the adapters)."""
    calls: dict[str, Callable[[], Any]] = {}
    checks: dict[str, Any] = {}
    for kind in TRAIN_KINDS if args.only in ("all", "train") else ():
        ours, theirs = pair(base, kind, args.tokens, trainable=True)
        checks[kind] = compare_forward(ours, theirs, train_inputs)
        fast = accelerated(ours)
        checks[f"{kind} with dt.accelerate"] = compare_loss(fast, theirs, train_inputs)
        calls[f"deltatune {kind}"] = train_step(ours, train_inputs)
        calls[f"deltatune+accelerate {kind}"] = train_step(fast, train_inputs)
        calls[f"peft {kind}"] = train_step(theirs, train_inputs)
    if args.only == "train":
        return calls, checks
    ours, theirs = pair(base, "prefix", args.tokens, trainable=False)
    ours.eval()
    theirs.eval()
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
               "use_cache": True, "pad_token_id": 0}
    checks["generate"] = compare_generate(ours, theirs, gen_inputs, options)
    calls["deltatune generate"] = lambda: ours.generate(**gen_inputs, **options)
    calls["peft generate"] = lambda: theirs.generate(**gen_inputs, **options)
    return calls, checks


def accelerated(model: Any) -> Any:
    """A copy of ``model`` with deltatune's opt-in fused kernels (``dt.accelerate``: the loss over the
    vocabulary without full logits, RMSNorm in one autograd function)."""
    import deltatune as dt

    return dt.accelerate(copy.deepcopy(model))


def compare_loss(ours: Any, theirs: Any, inputs: dict[str, Any]) -> dict[str, float]:
    """The training loss of both (an accelerated causal LM returns no logits when given labels)."""
    with torch.no_grad():
        return {"loss_max_abs_diff": (ours(**inputs).loss - theirs(**inputs).loss).abs().item()}


def compare_forward(ours: Any, theirs: Any, inputs: dict[str, Any]) -> dict[str, float]:
    """Max abs difference of the logits and of the loss of one training-mode forward."""
    ours.train()
    theirs.train()
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs)
    return {"logits_max_abs_diff": (a.logits - b.logits).abs().max().item(),
            "loss_abs_diff": (a.loss - b.loss).abs().item()}


def compare_generate(ours: Any, theirs: Any, inputs: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Whether both libraries generate the same tokens (and that the prefix changes them)."""
    import deltatune as dt

    with torch.no_grad():
        a, b = ours.generate(**inputs, **options), theirs.generate(**inputs, **options)
        with dt.disabled(ours):
            plain = ours.generate(**inputs, **options)
    return {"identical_tokens": bool(torch.equal(a, b)), "shape": list(a.shape),
            "prefix_changes_tokens": not torch.equal(a, plain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model (checks the script runs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20, help="num_virtual_tokens")
    parser.add_argument("--batch", type=int, default=None, help="training rows (default: the shape's, 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="training tokens per row (default: the shape's, 256)")
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=("all", "train", "generate"), default="all",
                        help="time only the training steps or only generation (results then go to "
                             "prompt_bench_<only>.json, or --out)")
    parser.add_argument("--out", default=None, help="results file name in bench/results (default: see --only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = shape_for("llama", args.quick, args.seq_len)
    batch = args.batch or shape.batch
    torch.manual_seed(0)
    base = build_llama(shape).float().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab_size, (batch, shape.seq_len), generator=gen)
    train_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    prompt = torch.randint(0, shape.vocab_size, (args.gen_batch, args.prompt_len), generator=gen)
    gen_inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    calls, checks = variants(base, args, train_inputs, gen_inputs)
    print(json.dumps({"equality": checks}, indent=2), flush=True)
    times: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}  # this thread's CPU time: less sensitive to a shared machine
    for fn in calls.values():  # warm-up
        fn()
    for index in range(args.rounds):
        order = list(calls.items())
        for key, fn in order if index % 2 == 0 else order[::-1]:  # alternate: neither library always runs first
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            times[key].append(time.perf_counter() - start)
            cpu[key].append(time.thread_time() - start_cpu)
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
              flush=True)
    settings = {**vars(args), "batch": batch, "seq_len": shape.seq_len, "hidden_size": shape.hidden_size,
                "num_hidden_layers": shape.num_hidden_layers, "vocab_size": shape.vocab_size}
    report = summarize(times, checks, settings, args.gen_batch * args.new_tokens)
    report["cpu_s"] = cpu
    report["wall_s"] = times
    if "deltatune generate" in cpu:
        report["generate_cpu_ratio_per_round"] = [t / o for o, t in zip(cpu["deltatune generate"], cpu["peft generate"])]
        report["ratios"]["generate tokens/s by CPU time, ours / peft"] = statistics.median(
            report["generate_cpu_ratio_per_round"])
    print(json.dumps(report, indent=2))
    name = args.out or "prompt_bench{}{}.json".format("" if args.only == "all" else f"_{args.only}",
                                                     "_quick" if args.quick else "")
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps(report, indent=2) + "\n")


def summarize(times: dict[str, list[float]], checks: dict[str, Any], settings: dict[str, Any],
              new_tokens: int) -> dict[str, Any]:
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratios: dict[str, float] = {}
    targets: dict[str, bool] = {}
    for kind in (k for k in TRAIN_KINDS if f"peft {k}" in times):
        ours, theirs = times[f"deltatune {kind}"], times[f"peft {kind}"]
        ratio = statistics.median(o / t for o, t in zip(ours, theirs))
        ratios[f"{kind} step time, ours / peft"] = ratio
        targets[f"{kind} step <= {TARGET_STEP}"] = ratio <= TARGET_STEP
        fast = times[f"deltatune+accelerate {kind}"]
        fast_ratio = statistics.median(o / t for o, t in zip(fast, theirs))
        ratios[f"{kind} step time, ours with dt.accelerate / peft"] = fast_ratio
        targets[f"{kind} step with dt.accelerate <= {TARGET_STEP}"] = fast_ratio <= TARGET_STEP
    tokens_per_s: dict[str, float] = {}
    per_round: list[float] = []
    if "peft generate" in times:
        ours, theirs = times["deltatune generate"], times["peft generate"]
        per_round = [t / o for o, t in zip(ours, theirs)]  # tokens/s ours over peft's = peft's time / ours
        ratios["generate tokens/s, ours / peft"] = statistics.median(per_round)
        targets[f"generate >= {TARGET_GEN}"] = statistics.median(per_round) >= TARGET_GEN
        tokens_per_s = {lib: new_tokens / medians[f"{lib} generate"] for lib in ("deltatune", "peft")}
    return {"settings": settings, "median_s": medians, "generate_tokens_per_s": tokens_per_s, "ratios": ratios,
            "generate_ratio_per_round": per_round,
            "targets_met": targets, "equality": checks, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "peft": __import__("peft").__version__}


if __name__ == "__main__":
    main()
