"""The HTTP routes (FastAPI): OpenAI's completions, chat completions and models, vLLM's adapter
loading and classification, and errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .errors import ServeError, bad_request
from .events import Delta, Done, Failed
from .responses import DONE_LINE, Reply, sse
from .schemas import (ChatCompletionRequest, ClassifyRequest, CompletionRequest, GenerationFields, LoadAdapterRequest,
                      UnloadAdapterRequest)
from .service import COMPLETION_DEFAULT_TOKENS, Run, Service, done_events


def create_app(service: Service) -> FastAPI:
    """The app serving ``service``; its worker thread runs while the app does (lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.worker.stop)

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    _error_handlers(app)
    _routes(app, service)
    return app


def _routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": service.models()}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        prompts = service.completion_prompts(body)
        return await _generate(service, body, prompts, body.max_tokens, COMPLETION_DEFAULT_TOKENS, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        prompt = service.chat_prompt(body)
        return await _generate(service, body, [prompt], body.token_budget(), None, chat=True)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        result = await service.classify(body)
        data = [{"index": i, "label": label, "probs": probs, "num_classes": len(probs)}
                for i, (_, label, probs) in enumerate(result.results)]
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model, "labels": service.labels(), "data": data,
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": 0,
                          "total_tokens": result.prompt_tokens}}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        await service.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        await service.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: adapter '{body.lora_name}' removed successfully.")


async def _generate(service: Service, body: GenerationFields, prompts: list[list[int]], asked: int | None,
                    default: int | None, chat: bool) -> Response:
    """Queue the prompts; answer with the whole result, or stream it as server-sent events."""
    run = service.generate(body, prompts, asked, default)
    reply = Reply(body.model, chat)
    if body.stream:
        return StreamingResponse(_stream(run, reply, body.wants_usage_chunk()), media_type="text/event-stream")
    try:
        finals = await run.finals()
    finally:
        run.cancel()  # the client went away (this task was cancelled) or it is over: nothing more to compute
    return JSONResponse(reply.whole(done_events(finals)))


async def _stream(run: Run, reply: Reply, with_usage: bool) -> AsyncGenerator[str, None]:
    """Chunks as the tokens come; an error ends the stream with an error event; then ``data: [DONE]``."""
    results: dict[int, Done] = {}
    failed = False
    try:
        if reply.chat:
            for index in range(run.count):
                yield sse(reply.chunk(index, None, role=True))
        async for index, event in run.events():
            if isinstance(event, Delta):
                yield sse(reply.chunk(index, event.text))
            elif isinstance(event, Done):
                results[index] = event
                yield sse(reply.chunk(index, None, event.finish_reason))
            elif isinstance(event, Failed):
                failed = True
                run.cancel()
                yield sse(event.error.body())
                break
        if with_usage and not failed:
            yield sse(reply.usage_chunk([results[i] for i in sorted(results)]))
        yield DONE_LINE
    finally:
        run.cancel()  # also when the client disconnects mid-stream: its rows leave the batch


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _as_json(_validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _as_json(ServeError(error.status_code, message, code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return _as_json(ServeError(500, f"internal error: {type(error).__name__}: {error}", "internal_error"))


def _as_json(error: ServeError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _validation_error(errors: Any) -> ServeError:
    """A 400 naming every bad field (or saying the body is not JSON), rather than FastAPI's 422 list."""
    errors = list(errors)
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return bad_request(f"the request body is not valid JSON ({detail.get('ctx', {}).get('error', 'parse error')})",
                           "invalid_json")
    parts, first = [], None
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        first = first or where
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return bad_request("invalid request: " + "; ".join(parts), "invalid_parameter", first)
