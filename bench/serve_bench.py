"""Serving throughput with eight adapters in the mix against one adapter, same requests.

What
    ``deltatune serve``'s app under uvicorn (in this process, on a free port) with a random-init
    LLaMA (by default 4 layers, hidden 256, 8 heads, 4 key/value heads, vocabulary 2,000, fp32,
    ~4M parameters; ``--hidden`` and ``--layers`` change it) and eight LoRA adapters (r=8 on q/k/v/o, random non-zero B). A round sends
    ``--requests`` concurrent completions (prompts of 16 to 48 tokens, ``max_tokens`` fixed,
    ``ignore_eos`` so every request generates exactly that many, greedy) over HTTP and times them
    until the last answer. Three workloads with the same prompts:

    mixed    request i asks for adapter a{i % 8}: every batch mixes the eight (``dt.routing``)
    single   every request asks for a0
    base     every request asks for the base model (no adapter): the floor

Why
    Serving many adapters on one base pays off only if a batch that mixes them costs about what
    a batch of one adapter costs. ``mixed / single`` is that price (1.0: free).

How
    Rounds run interleaved (mixed, single, base, mixed, ...) after one warm-up round of each, so
    slow drifts of the machine hit every workload alike; each workload reports the median
    tokens/s over its rounds, and ``mixed_over_single_per_round`` the median of the ratio within
    each round (the two ran back to back: the figure least moved by a busy machine). The generated tokens are checked to be identical between two
    rounds of the same workload (greedy). Results go to bench/results/serve_bench.json.

    python bench/serve_bench.py                  # ~2 min on an idle 2-core box
    python bench/serve_bench.py --rounds 3 --requests 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

WORKLOADS = ("mixed", "single", "base")
ADAPTERS = [f"a{i}" for i in range(8)]
RESULTS = Path(__file__).parent / "results" / "serve_bench.json"


def build_model(root: Path, hidden: int = 256, layers: int = 4) -> tuple[Path, dict[str, Path]]:
    """A random LLaMA folder with a word-level tokenizer, and eight saved LoRA adapters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import deltatune as dt

    base = root / "bench-llama"
    base.mkdir()
    words = ["[UNK]", "</s>", *(f"w{i}" for i in range(1998))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(base)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=hidden * 8 // 3, vocab_size=len(words), max_position_embeddings=256,
                         eos_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        dt.attach(model, dt.LoraConfig(r=8, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                        "o_proj"]), name=name)
    dt.save(model, root / "adapters", names=ADAPTERS)
    return base, {name: root / "adapters" / name for name in ADAPTERS}


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(2, 2000)}" for _ in range(rng.randint(16, 48))) for _ in range(count)]


def requests_for(workload: str, texts: list[str], max_tokens: int, base_name: str) -> list[dict[str, Any]]:
    def model(i: int) -> str:
        return {"mixed": ADAPTERS[i % len(ADAPTERS)], "single": ADAPTERS[0], "base": base_name}[workload]

    return [{"model": model(i), "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            for i, text in enumerate(texts)]


async def one_round(url: str, requests: list[dict[str, Any]]) -> tuple[float, int, list[str]]:
    """Seconds until every request is answered, the completion tokens, and the texts."""
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/v1/completions", json=r) for r in requests))
        seconds = time.perf_counter() - start
    bodies = [r.json() for r in responses]
    bad = [b for b in bodies if "choices" not in b]
    if bad:
        raise RuntimeError(f"a request failed: {bad[0]}")
    return seconds, sum(b["usage"]["completion_tokens"] for b in bodies), [b["choices"][0]["text"] for b in bodies]


def serve_in_thread(service: Any) -> tuple[Any, threading.Thread, str]:
    import uvicorn

    from deltatune.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="")
    parser.add_argument("--hidden", type=int, default=256, help="the model's width (multiple of 8)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from deltatune.serve import Limits, Settings, build_service

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build_model(Path(tmp), args.hidden, args.layers)
        settings = Settings(str(base), [(n, str(p)) for n, p in adapters.items()], device=args.device,
                            limits=Limits(max_batch_size=args.max_batch_size, max_new_tokens=args.max_tokens))
        service = build_service(settings)
        server, thread, url = serve_in_thread(service)
        texts = prompts(args.requests)
        work = {w: requests_for(w, texts, args.max_tokens, base.name) for w in WORKLOADS}
        speeds: dict[str, list[float]] = {w: [] for w in WORKLOADS}
        outputs: dict[str, list[str]] = {}
        try:
            for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
                for workload in WORKLOADS:
                    seconds, tokens, texts_out = asyncio.run(one_round(url, work[workload]))
                    if outputs.setdefault(workload, texts_out) != texts_out:
                        raise RuntimeError(f"{workload}: greedy outputs changed between rounds")
                    if round_:
                        speeds[workload].append(tokens / seconds)
                    print(f"round {round_} {workload:>6}: {tokens} tokens in {seconds:.2f} s = "
                          f"{tokens / seconds:.0f} tok/s", flush=True)
        finally:
            server.should_exit = True
            thread.join(60)
        stats = vars(getattr(service.worker, "stats"))
    medians = {w: statistics.median(v) for w, v in speeds.items()}
    # each round's workloads ran back to back: their ratio within a round is the least drift-prone figure
    per_round = [m / s for m, s in zip(speeds["mixed"], speeds["single"], strict=True)]
    result = {
        "setup": {"model": f"LLaMA {args.layers} layers x {args.hidden}, vocab 2000, fp32",
                  "adapters": "8 x LoRA r=8 q/k/v/o",
                  "requests": args.requests, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
                  "prompt_tokens": "16-48", "threads": args.threads, "rounds": args.rounds,
                  "device": str(next(service.served.model.parameters()).device), "torch": torch.__version__},
        "tokens_per_s": {w: {"median": round(m, 1), "rounds": [round(x, 1) for x in speeds[w]]}
                         for w, m in medians.items()},
        "mixed_over_single": round(medians["mixed"] / medians["single"], 3),
        "mixed_over_single_per_round": {"median": round(statistics.median(per_round), 3),
                                        "rounds": [round(r, 3) for r in per_round]},
        "single_over_base": round(medians["single"] / medians["base"], 3),
        "batches": {"decode_steps": stats["steps"], "mean_rows": round(stats["rows"] / max(stats["steps"], 1), 1),
                    "steps_mixing_adapters": stats["mixed_steps"]},
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
