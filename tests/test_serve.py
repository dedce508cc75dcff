"""``deltatune serve`` for real: uvicorn on a free port, a tiny random LLaMA with eight adapters, httpx clients.

Every answer is compared with the same request run alone (``model.generate``, greedy, with only that
adapter active, on a separate copy of the model), including under 64 concurrent requests that the
server batches together across adapters. Classification runs on a tiny seq-cls run folder.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import deltatune as dt  # noqa: E402
from deltatune.serve import Limits, Service, Settings, build_service, create_app  # noqa: E402
from conftest import sentiment_rows, train_command  # noqa: E402
from task_fixtures import A_WORDS, B_WORDS, llama_folder, word_tokenizer  # noqa: E402

ADAPTERS = [f"a{i}" for i in range(8)]
TARGETS = ["q_proj", "v_proj", "o_proj"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
MAX_NEW = 24
MAX_PROMPT = 24


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny LLaMA folder (word tokenizer with a chat template), eight LoRA adapters, and a broken (NaN) one."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("serve")
    base = root / "tiny-llama"
    base.mkdir()
    tokenizer = word_tokenizer(base, "decoder")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    llama_folder(base, len(tokenizer), tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(base)
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        dt.attach(model, dt.LoraConfig(r=4, init_lora_weights=False, target_modules=TARGETS), name=name)
    dt.save(model, root / "adapters", names=ADAPTERS)
    broken = AutoModelForCausalLM.from_pretrained(base)
    dt.attach(broken, dt.LoraConfig(r=4, init_lora_weights=False, target_modules=TARGETS), name="broken")
    with torch.no_grad():
        for param in broken.parameters():
            if param.requires_grad:
                param.fill_(float("nan"))
    dt.save(broken, root / "broken", names=["broken"])
    prompted = AutoModelForCausalLM.from_pretrained(base)
    dt.attach(prompted, dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), name="prompted")
    dt.save(prompted, root / "prompted", names=["prompted"])
    return {"base": base, "tokenizer": tokenizer, "eos": tokenizer.eos_token_id,
            "adapters": {n: root / "adapters" / n for n in ADAPTERS}, "broken": root / "broken" / "broken",
            "prompted": root / "prompted" / "prompted"}


class Reference:
    """The same model loaded separately: each request run alone with ``generate`` (greedy)."""

    def __init__(self, lm: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        self.tokenizer, self.eos = lm["tokenizer"], lm["eos"]
        self.model = AutoModelForCausalLM.from_pretrained(lm["base"]).eval()
        self.model.generation_config.pad_token_id = self.eos
        for name, folder in lm["adapters"].items():
            dt.load(self.model, folder, name=name)
        self.memo: dict[tuple[Any, ...], tuple[str, int, str]] = {}

    def ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def alone(self, ids: list[int], adapter: str | None, max_tokens: int) -> tuple[str, int, str]:
        """(text, completion tokens, finish reason) of the prompt run by itself."""
        key = (tuple(ids), adapter, max_tokens)
        if key not in self.memo:
            self.memo[key] = self._run(ids, adapter, max_tokens)
        return self.memo[key]

    @torch.inference_mode()
    def _run(self, ids: list[int], adapter: str | None, max_tokens: int) -> tuple[str, int, str]:
        if adapter is None:
            with dt.disabled(self.model):
                out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        else:
            dt.set_active(self.model, adapter)
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        new = out[0, len(ids):].tolist()
        finish = "stop" if new[-1] == self.eos else "length"
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new), finish


@pytest.fixture(scope="module")
def reference(lm: dict[str, Any]) -> Reference:
    return Reference(lm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(service: Service) -> Iterator[str]:
    """The app under a real uvicorn server in a thread; yields its base URL, stops it afterwards."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def served(lm: dict[str, Any]) -> Iterator[tuple[Service, str]]:
    settings = Settings(str(lm["base"]), [(n, str(p)) for n, p in lm["adapters"].items()],
                        limits=Limits(max_batch_size=16, max_new_tokens=MAX_NEW, max_prompt_tokens=MAX_PROMPT))
    service = build_service(settings)
    with running(service) as url:
        yield service, url


@pytest.fixture
def client(served: tuple[Service, str]) -> Iterator[Any]:
    with httpx.Client(base_url=served[1], timeout=60) as c:
        yield c


def prompt_text(seed: int) -> str:
    """A prompt of 2 to 8 vocabulary words."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(A_WORDS + B_WORDS) for _ in range(rng.randint(2, 8)))


def completion(model: str, prompt: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def sse_events(lines: list[str]) -> list[Any]:
    """The JSON payloads of a server-sent event stream, and "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected stream line {line!r}"
    return events


def streamed_text(events: list[Any], chat: bool = False) -> tuple[str, str | None]:
    """The text a stream carried (its chunks joined) and its finish reason."""
    assert events[-1] == "[DONE]"
    text, finish = "", None
    for event in events[:-1]:
        assert "error" not in event, event
        for choice in event["choices"]:
            piece = choice["delta"].get("content") if chat else choice["text"]
            text += piece or ""
            finish = choice["finish_reason"] or finish
    return text, finish


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    return dict(body["error"])


# --------------------------------------------------------------------------- generation


def test_models_lists_the_base_and_every_adapter(client: Any, lm: dict[str, Any]) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-llama", *ADAPTERS]
    assert data[0]["parent"] is None and all(m["parent"] == "tiny-llama" for m in data[1:])
    assert data[3]["root"] == str(lm["adapters"]["a2"])


@pytest.mark.parametrize("model", ["tiny-llama", "a3"])
def test_a_completion_equals_the_request_run_alone(client: Any, reference: Reference, model: str) -> None:
    prompt = "a1 b2 a3 b4"
    body = client.post("/v1/completions", json=completion(model, prompt, 12)).json()
    text, tokens, finish = reference.alone(reference.ids(prompt), None if model == "tiny-llama" else model, 12)
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == finish
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}


def test_streaming_sends_the_same_text_in_chunks(client: Any, reference: Reference) -> None:
    prompt = "b7 a2 a9"
    request = completion("a5", prompt, 16, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(response.iter_lines()))
    text, tokens, finish = reference.alone(reference.ids(prompt), "a5", 16)
    assert streamed_text(events) == (text, finish)
    assert sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["text"]) > 1  # several chunks, not one
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == tokens


def test_chat_uses_the_chat_template_and_streams(client: Any, reference: Reference, lm: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "a4 a5"}]
    ids = reference.ids(lm["tokenizer"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    text, tokens, finish = reference.alone(ids, "a6", 10)
    body = client.post("/v1/chat/completions", json={"model": "a6", "messages": messages, "max_tokens": 10,
                                                     "temperature": 0}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == finish and body["usage"]["completion_tokens"] == tokens
    with client.stream("POST", "/v1/chat/completions", json={"model": "a6", "messages": messages, "stream": True,
                                                             "max_completion_tokens": 10, "temperature": 0}) as r:
        events = sse_events(list(r.iter_lines()))
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(events, chat=True) == (text, finish)


def test_several_prompts_give_one_choice_each(client: Any, reference: Reference) -> None:
    prompts = ["a1 a2", "b3 b4 b5", "a6"]
    body = client.post("/v1/completions", json=completion("a1", prompts, 6)).json()
    expected = [reference.alone(reference.ids(p), "a1", 6) for p in prompts]
    assert [c["text"] for c in body["choices"]] == [e[0] for e in expected]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == sum(e[1] for e in expected)


def test_stop_strings_cut_the_text(client: Any, reference: Reference) -> None:
    prompt = "a1 b2 a3 b4"
    full, _, _ = reference.alone(reference.ids(prompt), "a2", 16)
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    body = client.post("/v1/completions", json=completion("a2", prompt, 16, stop=[stop, "never-seen"])).json()
    assert body["choices"][0]["text"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json=completion("a2", prompt, 16, stop=stop, stream=True)) as r:
        assert streamed_text(sse_events(list(r.iter_lines()))) == (full[:full.index(stop)], "stop")


def test_sampling_is_seeded_per_request(client: Any) -> None:
    request = completion("a4", "a1 a2 a3", 12, temperature=1.3, top_p=0.9, seed=7, ignore_eos=True)
    body = client.post("/v1/completions", json=request).json()
    first = body["choices"][0]["text"]
    again = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    other = client.post("/v1/completions", json={**request, "seed": 8}).json()["choices"][0]["text"]
    greedy = client.post("/v1/completions", json={**request, "temperature": 0}).json()["choices"][0]["text"]
    assert first == again
    assert body["usage"]["completion_tokens"] == 12 and body["choices"][0]["finish_reason"] == "length"
    assert len({first, other, greedy}) > 1


def test_64_concurrent_requests_over_8_adapters_equal_each_request_alone(
        served: tuple[Service, str], reference: Reference) -> None:
    service, url = served
    requests = [completion([None, *ADAPTERS][i % 9] or "tiny-llama", prompt_text(i), 4 + i % 9,
                           stream=i % 4 == 0) for i in range(64)]
    before = dt_stats(service)

    async def send_all() -> list[tuple[int, str, str | None, int | None]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return list(await asyncio.gather(*(one(client, r) for r in requests)))

    async def one(client: Any, request: dict[str, Any]) -> tuple[int, str, str | None, int | None]:
        if request["stream"]:
            async with client.stream("POST", "/v1/completions", json=request) as response:
                lines = [line async for line in response.aiter_lines()]
            return (response.status_code, *streamed_text(sse_events(lines)), None)
        response = await client.post("/v1/completions", json=request)
        body = response.json()
        choice = body["choices"][0]
        return response.status_code, choice["text"], choice["finish_reason"], body["usage"]["completion_tokens"]

    results = asyncio.run(send_all())
    for request, (status, text, finish, tokens) in zip(requests, results, strict=True):
        adapter = None if request["model"] == "tiny-llama" else request["model"]
        expected = reference.alone(reference.ids(request["prompt"]), adapter, request["max_tokens"])
        assert status == 200
        assert (text, finish) == (expected[0], expected[2]), request
        assert tokens in (None, expected[1])
    after = dt_stats(service)
    assert after["max_rows"] > 1 and after["mixed_steps"] > before["mixed_steps"]  # batched, adapters mixed
    assert after["joined_running"] > before["joined_running"]  # requests joined batches already decoding


def dt_stats(service: Service) -> dict[str, int]:
    stats = getattr(service.worker, "stats")
    return {k: int(v) for k, v in vars(stats).items()}


# --------------------------------------------------------------------------- adapters at run time


def test_load_and_unload_at_run_time(client: Any, reference: Reference, lm: dict[str, Any]) -> None:
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(lm["adapters"]["a7"])})
    assert response.status_code == 200, response.text
    assert "late" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    prompt = "b1 b2 b3"
    text, _, _ = reference.alone(reference.ids(prompt), "a7", 8)
    assert client.post("/v1/completions", json=completion("late", prompt)).json()["choices"][0]["text"] == text
    taken = client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(lm["adapters"]["a1"])})
    assert error_of(taken, 400)["code"] == "name_taken"
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert error_of(client.post("/v1/completions", json=completion("late", prompt)), 404)["code"] == "model_not_found"
    assert "late" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert error_of(client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}), 404)
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such/folder"})
    assert error_of(missing, 400)["code"] == "adapter_not_found"
    virtual = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(lm["prompted"])})
    assert error_of(virtual, 400)["code"] == "adapter_not_servable"  # virtual tokens: rows would change length
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama", *ADAPTERS]
    assert error_of(client.post("/v1/unload_lora_adapter", json={"lora_name": "tiny-llama"}), 400)


def test_unload_waits_for_the_requests_using_the_adapter(served: tuple[Service, str], reference: Reference,
                                                         lm: dict[str, Any]) -> None:
    """An unload takes the name away from new requests at once, but removes the adapter only after the
    requests already admitted with it are done: they finish exactly as alone. The worker is held
    between two steps meanwhile, so the request is certainly in flight when the unload comes."""
    service, url = served
    worker = service.worker
    prompt = "a3 a3 b9"
    expected = reference.alone(reference.ids(prompt), "a0", 12)[0]
    entered, gate = threading.Event(), threading.Event()

    async def until(condition: Any) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)

    async def scenario() -> tuple[str, int, int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "brief",
                                                                      "lora_path": str(lm["adapters"]["a0"])})
            assert loaded.status_code == 200
            held = worker.call(lambda: (entered.set(), gate.wait(20)))
            await until(entered.is_set)

            async def stream() -> str:
                request = completion("brief", prompt, 12, stream=True)
                async with client.stream("POST", "/v1/completions", json=request) as response:
                    return streamed_text(sse_events([line async for line in response.aiter_lines()]))[0]

            in_flight = asyncio.ensure_future(stream())
            await until(lambda: len(worker.waiting) == 1)
            unload = asyncio.ensure_future(client.post("/v1/unload_lora_adapter", json={"lora_name": "brief"}))
            await until(lambda: service.table.adapters["brief"].state == "unloading")
            refused = await client.post("/v1/completions", json=completion("brief", prompt))
            gate.set()
            held.result(10)
            return await in_flight, (await unload).status_code, refused.status_code

    try:
        text, unloaded, refused = asyncio.run(scenario())
    finally:
        gate.set()
    assert (text, unloaded, refused) == (expected, 200, 404)
    assert "brief" not in service.table.adapters


def test_a_client_that_goes_away_leaves_the_batch(served: tuple[Service, str]) -> None:
    """Closing a stream cancels its request: the worker drops it instead of generating for nobody."""
    service, url = served
    worker = service.worker
    entered, gate = threading.Event(), threading.Event()
    held = worker.call(lambda: (entered.set(), gate.wait(20)))
    try:
        assert entered.wait(10)
        with httpx.Client(base_url=url, timeout=30) as client:
            request = completion("a1", "a1 a2", MAX_NEW, stream=True, ignore_eos=True)
            with client.stream("POST", "/v1/completions", json=request) as response:
                assert response.status_code == 200
                deadline = time.monotonic() + 10
                while not worker.waiting:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                job = worker.waiting[0]
            deadline = time.monotonic() + 10
            while not job.cancelled:  # the server noticed the disconnect
                assert time.monotonic() < deadline
                time.sleep(0.005)
    finally:
        gate.set()
    held.result(10)
    deadline = time.monotonic() + 10
    while worker.waiting or worker.batch:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert job.output == []


# --------------------------------------------------------------------------- errors


def test_bad_requests_get_clear_4xx_errors_and_the_server_keeps_serving(client: Any, reference: Reference) -> None:
    unknown = error_of(client.post("/v1/completions", json=completion("nope", "a1")), 404)
    assert unknown["code"] == "model_not_found" and "nope" in unknown["message"]
    too_long = error_of(client.post("/v1/completions", json=completion("a1", " ".join(["a1"] * (MAX_PROMPT + 1)))),
                        400)
    assert too_long["code"] == "context_length_exceeded" and str(MAX_PROMPT) in too_long["message"]
    bad_json = client.post("/v1/completions", content=b'{"model": "a1", "prompt": ', headers={
        "content-type": "application/json"})
    assert error_of(bad_json, 400)["code"] == "invalid_json"
    for field, value in (("temperature", -1), ("top_p", 0), ("max_tokens", 0), ("n", 2), ("logprobs", 3),
                         ("max_tokens", MAX_NEW + 1), ("stop", [""]), ("prompt", []), ("prompt", [[5, 99999]])):
        error = error_of(client.post("/v1/completions", json={**completion("a1", "a1 a2"), field: value}), 400)
        assert field in error["message"] or field == "prompt" and "prompt" in error["message"], error
    missing = error_of(client.post("/v1/completions", json={"model": "a1"}), 400)
    assert "prompt" in missing["message"]
    assert error_of(client.post("/v1/chat/completions", json={"model": "a1", "messages": []}), 400)
    assert error_of(client.post("/v1/classify", json={"model": "a1", "input": "a1"}), 400)["code"] == "wrong_endpoint"
    assert error_of(client.get("/v1/no-such-endpoint"), 404)
    text, _, _ = reference.alone(reference.ids("a1 a2"), "a1", 8)
    assert client.post("/v1/completions", json=completion("a1", "a1 a2")).json()["choices"][0]["text"] == text


def test_chat_without_a_template_is_a_clear_400(served: tuple[Service, str], client: Any) -> None:
    tokenizer = served[0].served.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        error = error_of(client.post("/v1/chat/completions", json={"model": "a1", "messages": [
            {"role": "user", "content": "a1"}]}), 400)
    finally:
        tokenizer.chat_template = template
    assert error["code"] == "no_chat_template" and "chat template" in error["message"]


def test_a_failure_in_a_batch_fails_only_its_request(served: tuple[Service, str], reference: Reference,
                                                     lm: dict[str, Any]) -> None:
    """An adapter whose weights are NaN: its request fails (500, also mid-stream), the requests batched
    with it complete exactly as alone, and the server goes on."""
    _, url = served
    prompts = [prompt_text(1000 + i) for i in range(6)]

    async def scenario() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "broken",
                                                                      "lora_path": str(lm["broken"])})
            assert loaded.status_code == 200, loaded.text
            calls = [client.post("/v1/completions", json=completion(ADAPTERS[i], p, 10)) for i, p in enumerate(prompts)]
            calls.append(client.post("/v1/completions", json=completion("broken", "a1 a2", 10)))
            responses = list(await asyncio.gather(*calls))
            async with client.stream("POST", "/v1/completions", json=completion("broken", "a1", 5, stream=True)) as r:
                responses.append([line async for line in r.aiter_lines()])
            await client.post("/v1/unload_lora_adapter", json={"lora_name": "broken"})
            return responses

    *good, bad, bad_stream = asyncio.run(scenario())
    for i, (prompt, response) in enumerate(zip(prompts, good, strict=True)):
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == reference.alone(reference.ids(prompt), ADAPTERS[i], 10)[0]
    assert "NaN" in error_of(bad, 500)["message"]
    events = sse_events(bad_stream)
    assert "error" in events[-2] and events[-1] == "[DONE]"


def test_a_step_that_breaks_fails_its_requests_and_the_worker_goes_on(
        served: tuple[Service, str], client: Any, reference: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure outside the per-request handling (here: injected into the decode step itself) fails
    the requests of the batch with a 500 and leaves the scheduler running."""
    worker = served[0].worker
    advance = worker._advance  # type: ignore[attr-defined]

    def broken() -> None:
        monkeypatch.setattr(worker, "_advance", advance)  # once
        raise RuntimeError("injected fault")

    monkeypatch.setattr(worker, "_advance", broken)
    error = error_of(client.post("/v1/completions", json=completion("a1", "a1 a2", 8)), 500)
    assert "injected fault" in error["message"]
    text = reference.alone(reference.ids("b1 a2"), "a2", 8)[0]
    assert client.post("/v1/completions", json=completion("a2", "b1 a2", 8)).json()["choices"][0]["text"] == text


# --------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def seq_cls_runs(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> list[Path]:
    """Two short seq-cls runs (other seeds: other adapters and heads) on one tiny BERT."""
    from deltatune.cli import main

    runs = []
    for seed in (1, 2):
        out = tmp_path_factory.mktemp(f"cls-run-{seed}")
        assert main(train_command(tiny_bert_dir, sentiment_file, out, "--max-steps", "3", "--seed", str(seed),
                                  "--eval-every", "0", "--lr", "5e-2")) == 0
        runs.append(out)
    return runs


def test_classify_a_seq_cls_run_and_another_adapter(seq_cls_runs: list[Path], keep_thread_count: None) -> None:
    """Labels and probabilities as `deltatune predict` computes them, per adapter, in mixed batches."""
    from deltatune.train.commands import predict_run
    from deltatune.train.run import rebuild

    first, second = seq_cls_runs
    service = build_service(Settings(str(first), [("second", str(second))], limits=Limits(max_batch_size=8)))
    texts = [r["text"] for r in sentiment_rows(10, 5)]
    expected = {name: [p["prediction"] for p in predict_run(run, [{"text": t} for t in texts])]
                for name, run in (("first", first), ("second", second))}
    model, task, _ = rebuild(first)
    with torch.inference_mode():
        batch = task.tokenizer(texts[:2], padding=True, return_tensors="pt")
        probs = torch.softmax(model(**batch).logits, dim=-1)
    with running(service) as url, httpx.Client(base_url=url, timeout=60) as client:
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert names[1:] == [first.name, "second"]

        async def both() -> list[Any]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                calls = [c.post("/v1/classify", json={"model": name, "input": [text]})
                         for text in texts for name in (first.name, "second")]
                return list(await asyncio.gather(*calls))

        answers = asyncio.run(both())
        got = {first.name: [a.json()["data"][0]["label"] for a in answers[0::2]],
               "second": [a.json()["data"][0]["label"] for a in answers[1::2]]}
        assert got == {first.name: expected["first"], "second": expected["second"]}
        body = client.post("/v1/classify", json={"model": first.name, "input": texts[:2]}).json()
        assert body["labels"] == ["negative", "positive"]
        assert [d["label"] for d in body["data"]] == expected["first"][:2]
        assert torch.allclose(torch.tensor([d["probs"] for d in body["data"]]), probs, atol=1e-5)
        assert body["usage"]["prompt_tokens"] == int(batch["attention_mask"].sum())
        assert error_of(client.post("/v1/completions", json=completion(first.name, "x")), 400)["code"] == \
            "wrong_endpoint"
        assert error_of(client.post("/v1/classify", json={"model": "zz", "input": "x"}), 404)
        assert error_of(client.post("/v1/classify", json={"model": "second", "input": []}), 400)


# --------------------------------------------------------------------------- the command line


def test_the_command_line_serves_until_interrupted(lm: dict[str, Any], reference: Reference) -> None:
    import signal
    import subprocess
    import sys

    port = free_port()
    command = [sys.executable, "-m", "deltatune.cli", "serve", "--model", str(lm["base"]), "--adapter",
               f"support={lm['adapters']['a2']}", "--port", str(port), "--max-batch-size", "4", "--threads", "1",
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "deltatune serve did not come up"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            body = client.post("/v1/completions", json=completion("support", "a1 b1", 6)).json()
        assert body["choices"][0]["text"] == reference.alone(reference.ids("a1 b1"), "a2", 6)[0]
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "tiny-llama" in output and "support" in output


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    import deltatune
    from deltatune.cli import main

    for name in [n for n in sys.modules if n == "deltatune.serve" or n.startswith("deltatune.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(deltatune, "serve", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--model", "anything"]) == 2
    assert "pip install 'deltatune[serve]'" in capsys.readouterr().err


def test_bad_serve_flags_are_refused_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli import main

    assert main(["serve", "--model", "m", "--adapter", "no-equals-sign"]) == 2
    assert "NAME=FOLDER" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--max-batch-size", "0"]) == 2
    assert main(["serve", "--model", "/no/such/model"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_only_the_serve_package_imports_the_web_framework() -> None:
    """``import deltatune`` (and the command line) must work without the serve extra: fastapi and uvicorn
    are imported only inside ``deltatune.serve``, which nothing imports at module level."""
    import re

    src = Path(dt.__file__).parent
    web = re.compile(r"^\s*(import|from)\s+(fastapi|uvicorn|starlette|httpx)\b", re.MULTILINE)
    eager = re.compile(r"^(import|from)\s+(\.|deltatune\.)serve\b|^from\s+(\.|deltatune)\s+import\s+.*\bserve\b",
                       re.MULTILINE)
    outside = [p for p in src.rglob("*.py") if "serve" not in p.relative_to(src).parts]
    assert not [p.name for p in outside if web.search(p.read_text())]
    assert not [p.name for p in outside if eager.search(p.read_text())]
