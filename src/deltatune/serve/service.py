"""Between the endpoints and the worker: prompts to token ids, limits, and events back to the event loop.

Validation happens here, before anything is queued, so a bad request costs the model nothing and gets
its 4xx at once (before a stream starts).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .classify import ClassifyJob, ClassifyWorker
from .engine import GenerationEngine, GenerationJob
from .errors import ServeError, bad_request
from .events import Classified, Delta, Done, Event, Failed
from .model import ServedModel
from .registry import AdapterTable
from .sampling import Sampling
from .schemas import ChatCompletionRequest, ClassifyRequest, CompletionRequest, GenerationFields
from .text import TextStream
from .worker import Worker

COMPLETION_DEFAULT_TOKENS = 16
"""OpenAI's default ``max_tokens`` for completions (chat defaults to whatever room is left)."""


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 32
    max_new_tokens: int = 1024
    """The most tokens one request may ask for (``--max-new-tokens-limit``)."""
    max_prompt_tokens: int | None = None
    """The longest prompt accepted; None: the model's context length less one token to generate."""


class Run:
    """The jobs of one request and the queue their events arrive on (from the worker thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.count = count
        self.jobs: list[Any] = []

    def sink(self, index: int) -> Any:
        def put(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass
        return put

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event until each job has ended (Done, Classified or Failed)."""
        open_jobs = self.count
        while open_jobs:
            index, event = await self.queue.get()
            if not isinstance(event, Delta):
                open_jobs -= 1
            yield index, event

    async def finals(self) -> list[Event]:
        """Each job's last event, by job index; the first failure is raised (the other jobs are cancelled)."""
        ends: dict[int, Event] = {}
        async for index, event in self.events():
            if isinstance(event, Failed):
                self.cancel()
                raise event.error
            if not isinstance(event, Delta):
                ends[index] = event
        return [ends[i] for i in range(self.count)]

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True


class Service:
    """One served model: its adapters' names, its worker, its limits."""

    def __init__(self, served: ServedModel, limits: Limits) -> None:
        self.served, self.limits = served, limits
        self.table = AdapterTable(served.base_name, served.base_path)
        if served.own_adapter is not None:
            self.table.adopt(served.own_adapter[0], served.own_adapter[1], served.base_path)
        self.worker: Worker
        if served.kind == "generate":
            self.worker = GenerationEngine(served.model, served.tokenizer, self.table, limits.max_batch_size)
        else:
            self.worker = ClassifyWorker(served.model, served.tokenizer, self.table, limits.max_batch_size,
                                         served.max_length)
        self.context = served.context_length()
        fallback = self.context - 1 if self.context else None
        bounds = [v for v in (limits.max_prompt_tokens, fallback) if v]
        self.max_prompt = min(bounds) if bounds else None

    def load_startup_adapters(self, adapters: Sequence[tuple[str, str]]) -> None:
        """The command line's ``--adapter NAME=FOLDER``, before serving starts; errors as DataError."""
        for name, folder in adapters:
            try:
                self.worker.load_now(name, folder)
            except ServeError as error:
                raise DataError(f"--adapter {name}={folder}: {error.message}") from None

    # -- generation -------------------------------------------------------------------------------

    def _require(self, kind: str, endpoint: str) -> None:
        if self.served.kind != kind:
            what = "generates text" if self.served.kind == "generate" else "classifies text"
            use = "/v1/completions or /v1/chat/completions" if self.served.kind == "generate" else "/v1/classify"
            raise bad_request(f"{endpoint} is not served here: this server's model ({self.served.base_name}) "
                              f"{what}; use {use}", "wrong_endpoint")

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt: text is tokenized as the model expects (with its special tokens)."""
        self._require("generate", "/v1/completions")
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            items = [[int(p) for p in prompt]]  # type: ignore[arg-type]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        return [self._ids(item) for item in items]

    def _ids(self, item: str | list[int]) -> list[int]:
        if isinstance(item, str):
            ids: list[int] = self.served.tokenizer(item)["input_ids"]
        else:
            vocab = len(self.served.tokenizer)
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                  "invalid_prompt", "prompt")
            ids = item
        if not ids:
            raise bad_request("the prompt is empty after tokenization: give some text", "invalid_prompt", "prompt")
        return ids

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The messages through the tokenizer's chat template, with the assistant's turn opened."""
        self._require("generate", "/v1/chat/completions")
        tokenizer = self.served.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request(f"the model {self.served.base_name!r} has no chat template (its tokenizer defines "
                              "none), so chat messages cannot be turned into a prompt; use /v1/completions with a "
                              "prompt you format yourself", "no_chat_template", "messages")
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template's own checks (e.g. roles must alternate)
            raise bad_request(f"the chat template refused these messages: {error}", "invalid_messages",
                              "messages") from None
        return self._ids_plain(str(text))

    def _ids_plain(self, text: str) -> list[int]:
        """Token ids of text a chat template produced: it already holds the special tokens it wants."""
        ids: list[int] = self.served.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise bad_request("the chat template produced an empty prompt", "invalid_messages", "messages")
        return ids

    def sampling(self, request: GenerationFields, prompt_tokens: int, asked: int | None,
                 default: int | None) -> Sampling:
        """The request's generation settings, refused (400) when the prompt or the budget does not fit."""
        if self.max_prompt is not None and prompt_tokens > self.max_prompt:
            raise bad_request(f"the prompt has {prompt_tokens} tokens; this server accepts at most {self.max_prompt} "
                              "(shorten the prompt)", "context_length_exceeded", "prompt")
        room = self.context - prompt_tokens if self.context else None
        if asked is None:
            asked = min(v for v in (default, room, self.limits.max_new_tokens) if v is not None)
        if asked > self.limits.max_new_tokens:
            raise bad_request(f"max_tokens={asked} is above this server's limit of {self.limits.max_new_tokens} "
                              "new tokens per request", "invalid_parameter", "max_tokens")
        if room is not None and asked > room:
            raise bad_request(f"this model's maximum context length is {self.context} tokens; the prompt has "
                              f"{prompt_tokens} and max_tokens asks for {asked} more. Lower max_tokens or shorten "
                              "the prompt", "context_length_exceeded", "max_tokens")
        return Sampling(max_tokens=asked, temperature=request.temperature, top_p=request.top_p,
                        stop=request.stop_strings(), seed=request.seed, ignore_eos=request.ignore_eos)

    def generate(self, request: GenerationFields, prompts: list[list[int]], asked: int | None,
                 default: int | None) -> Run:
        """Queue one job per prompt for the adapter ``request.model`` names; their events come on the Run."""
        settings = [self.sampling(request, len(p), asked, default) for p in prompts]
        run = Run(asyncio.get_running_loop(), len(prompts))
        run.jobs = [GenerationJob(p, s, TextStream(self.served.tokenizer, s.stop), run.sink(i))
                    for i, (p, s) in enumerate(zip(prompts, settings, strict=True))]
        self.worker.submit(request.model, run.jobs)
        return run

    # -- classification ---------------------------------------------------------------------------

    async def classify(self, request: ClassifyRequest) -> Classified:
        self._require("classify", "/v1/classify")
        run = Run(asyncio.get_running_loop(), 1)
        run.jobs = [ClassifyJob(request.texts(), run.sink(0))]
        self.worker.submit(request.model, run.jobs)
        (event,) = await run.finals()
        assert isinstance(event, Classified)
        return event

    def labels(self) -> list[str]:
        return self.worker.labels if isinstance(self.worker, ClassifyWorker) else []

    # -- adapters ---------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.wrap_future(self.worker.load_adapter(name, path))

    async def unload_adapter(self, name: str) -> None:
        await asyncio.wrap_future(self.worker.unload_adapter(name))

    def models(self) -> list[dict[str, Any]]:
        with self.worker.lock:
            return self.table.listing()


def done_events(events: list[Event]) -> list[Done]:
    out = [e for e in events if isinstance(e, Done)]
    if len(out) != len(events):
        raise ServeError(500, "a generation ended without a result", "internal_error")
    return out
