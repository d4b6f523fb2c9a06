"""``posttrain serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the serving engine: one base model
and many LoRA adapters decoded together (``serve.engine``), adapters managed at run time (``serve.adapters``).

Loud first: an unknown ``model`` is a 404 ``model_not_found``, never the base's answer; a path outside the allowed
directories a 403; a mismatching adapter a 400 with its reason; unknown request fields a 400 (OpenAI's API does
the same); every error is OpenAI's error object. The engine runs on its own thread; request handlers hand it work
through ``asyncio.to_thread`` and receive streamed tokens through ``loop.call_soon_threadsafe``. A client that goes
away cancels its request (its rows leave the batch at the next token); SIGTERM lets uvicorn finish the open
requests, then the engine drains and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.data.dataset import end_of_turn_ids, use_chat_template
from posttrain.models.loading import model_dir_of
from posttrain.rollout.hf import render_prompt_ids
from posttrain.serve.adapters import (
    AdapterCapacityError,
    AdapterError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AdapterPathError,
    AdapterRegistry,
)
from posttrain.serve.engine import Engine, EngineStoppedError, QueueFullError, RequestLimitError
from posttrain.serve.metrics import ServeMetrics
from posttrain.serve.request import ChoiceDelta, GenerationRequest, RequestHandle, TokenLogprob

# Exceptions → (HTTP status, OpenAI error type, code). Order matters: subclasses before AdapterError.
ERRORS: list[tuple[type[BaseException], int, str, str | None]] = [
    (AdapterNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (AdapterPathError, 403, "permission_error", "adapter_path_not_allowed"),
    (AdapterMismatchError, 400, "invalid_request_error", "adapter_mismatch"),
    (AdapterCapacityError, 503, "server_error", "adapters_busy"),
    (AdapterError, 400, "invalid_request_error", "adapter_error"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (RequestLimitError, 400, "invalid_request_error", "over_limit"),
    (EngineStoppedError, 503, "server_error", "shutting_down"),
    (FileNotFoundError, 400, "invalid_request_error", "adapter_not_found_on_disk"),
    (TimeoutError, 504, "server_error", "timeout"),
]


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    @classmethod
    def of(cls, error: BaseException) -> ApiError:
        for kind, status, type_, code in ERRORS:
            if isinstance(error, kind):
                return cls(status, str(error), type_, code)
        raise error

    def response(self) -> Any:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unsupported parameter is refused, not silently ignored


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class _Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class CompletionBody(_Sampling):
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)


class LoadAdapterBody(_Body):
    lora_name: str
    lora_path: str


class UnloadAdapterBody(_Body):
    lora_name: str


# ---------------------------------------------------------------------------------------------------- the server
@dataclass
class ServerParts:
    app: Any
    engine: Engine
    registry: AdapterRegistry
    tokenizer: Any
    base_name: str


def build_server(
    base: str,
    adapters: dict[str, str],
    adapter_dirs: list[str],
    api_key: str | None = None,
    max_loaded: int = 8,
    max_batch_size: int = 32,
    max_waiting: int = 256,
    max_body_bytes: int = 1 << 20,
) -> ServerParts:
    """Load the base and the pinned adapters, and make the app (the engine starts with the app)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = model_dir_of(base)
    if (base_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{base}: an adapter, not a base model; serve its base and pass it with --adapter")
    base_name = Path(base).resolve().name if base_dir != Path(base) else base_dir.resolve().name
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    stop_ids = set(end_of_turn_ids(tokenizer, use_chat_template(tokenizer, None)))
    registry = AdapterRegistry(model, base_dir, adapter_dirs=adapter_dirs, max_loaded=max(max_loaded, len(adapters)))
    for name, path in adapters.items():
        registry.load(name, path, pin=True, trusted=True)
    engine = Engine(registry, tokenizer, stop_ids, max_batch_size=max_batch_size, max_waiting=max_waiting)
    app = create_app(engine, registry, tokenizer, base_name, api_key, max_body_bytes)
    return ServerParts(app, engine, registry, tokenizer, base_name)


def create_app(
    engine: Engine,
    registry: AdapterRegistry,
    tokenizer: Any,
    base_name: str,
    api_key: str | None,
    max_body_bytes: int,
) -> Any:
    metrics = ServeMetrics(engine, registry)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:  # uvicorn has finished the open requests (graceful shutdown): drain what is left, then stop
            await asyncio.to_thread(engine.stop, True, 60.0)

    app = FastAPI(title="posttrain serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Any:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Any:
        # FastAPI's own refusals (a body that is not JSON or not UTF-8, an unknown route, a wrong method) in
        # OpenAI's error shape too.
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return ApiError(error.status_code, str(error.detail), kind, "invalid_request").response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> Any:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(
            400,
            f"{where or 'body'}: {first.get('msg', 'invalid request')}",
            "invalid_request_error",
            "invalid_request",
            where or None,
        ).response()

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return ApiError(
                413, f"request body over {max_body_bytes} bytes", "invalid_request_error", "body_too_large"
            ).response()
        if request.url.path.startswith("/v1/") and api_key is not None:
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return ApiError(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    "authentication_error",
                    "invalid_api_key",
                ).response()
        return await call_next(request)

    def adapter_of(model: str) -> str | None:
        return None if model == base_name else model

    def admin() -> None:
        if api_key is None:
            raise ApiError(
                403, "adapter management needs the server started with --api-key", "permission_error", "admin_disabled"
            )

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Any:
        body, content_type = metrics.exposition()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> Any:
        data = [
            {
                "id": base_name,
                "object": "model",
                "created": created,
                "owned_by": "posttrain",
                "root": str(registry.base_dir),
                "parent": None,
            }
        ]
        for adapter in registry.adapters():
            data.append(
                {
                    "id": adapter.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "posttrain",
                    "root": str(adapter.path),
                    "parent": base_name,
                    "pinned": adapter.pinned,
                    "in_use": adapter.in_use,
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterBody) -> Any:
        admin()
        try:
            await asyncio.to_thread(registry.load, body.lora_name, body.lora_path)
        except Exception as error:
            raise ApiError.of(error) from None
        return {"status": "loaded", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterBody) -> Any:
        admin()
        try:
            await asyncio.to_thread(registry.unload, body.lora_name, 60.0)
        except Exception as error:
            raise ApiError.of(error) from None
        return {"status": "unloaded", "lora_name": body.lora_name}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Any:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt_ids = render_prompt_ids(tokenizer, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(engine.context_length - len(prompt_ids), 1)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise ApiError(
                400, "top_logprobs needs logprobs=true", "invalid_request_error", "invalid_request", "top_logprobs"
            )
        generation = _generation(body, prompt_ids, max_tokens, body.logprobs, top, adapter_of(body.model))
        return await _answer(request, body, generation, "chat.completion", True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        prompt_ids = tokenizer(body.prompt)["input_ids"]
        top = body.logprobs or 0
        generation = _generation(
            body, prompt_ids, body.max_tokens, body.logprobs is not None, top, adapter_of(body.model)
        )
        return await _answer(request, body, generation, "text_completion", False)

    def _generation(
        body: _Sampling, prompt_ids: list[int], max_tokens: int, logprobs: bool, top: int, adapter: str | None
    ) -> GenerationRequest:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return GenerationRequest(
            tuple(prompt_ids),
            adapter,
            max_tokens,
            body.temperature,
            body.top_p,
            0,
            (),
            stop,
            body.seed,
            body.n,
            logprobs,
            top,
        )

    async def _submit(generation: GenerationRequest, on_delta: Any = None) -> RequestHandle:
        try:
            return await asyncio.to_thread(engine.submit, generation, on_delta)
        except Exception as error:
            raise ApiError.of(error) from None

    async def _answer(request: Request, body: _Sampling, generation: GenerationRequest, kind: str, chat: bool) -> Any:
        answer_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if not body.stream:
            handle = await _submit(generation)
            try:
                await asyncio.to_thread(handle.wait)
            except Exception as error:
                raise ApiError.of(error) from None
            metrics.finished(handle)
            choices = [_choice(c.index, c.text, c.finish_reason, c.logprobs, chat, generation) for c in handle.choices]
            return JSONResponse(
                {
                    "id": answer_id,
                    "object": kind,
                    "created": int(time.time()),
                    "model": body.model,
                    "choices": choices,
                    "usage": _usage(handle),
                }
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ChoiceDelta | None] = asyncio.Queue()
        handle = await _submit(generation, lambda delta: loop.call_soon_threadsafe(events.put_nowait, delta))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            try:
                if chat:  # OpenAI's first chunk gives each choice its role
                    for index in range(generation.n):
                        yield _sse(
                            answer_id,
                            chunk_kind,
                            body.model,
                            [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                            include_usage,
                        )
                while (delta := await events.get()) is not None:
                    if not delta.text and delta.finish_reason is None and not delta.logprobs:
                        continue
                    choice = _choice(
                        delta.index,
                        delta.text,
                        delta.finish_reason,
                        list(delta.logprobs),
                        chat,
                        generation,
                        streamed=True,
                    )
                    yield _sse(answer_id, chunk_kind, body.model, [choice], include_usage)
                if handle.error is not None:
                    error = ApiError.of(handle.error) if not isinstance(handle.error, ApiError) else handle.error
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "error": {
                                    "message": error.message,
                                    "type": error.type,
                                    "param": None,
                                    "code": error.code,
                                }
                            }
                        )
                        + "\n\n"
                    )
                    return
                metrics.finished(handle)
                if include_usage:
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "id": answer_id,
                                "object": chunk_kind,
                                "created": int(time.time()),
                                "model": body.model,
                                "choices": [],
                                "usage": _usage(handle),
                            }
                        )
                        + "\n\n"
                    )
                yield "data: [DONE]\n\n"
            finally:
                if not handle.done:  # the client went away: its rows leave the batch at the next token
                    handle.cancel()
                    metrics.cancelled()

        return StreamingResponse(stream(), media_type="text/event-stream")

    def _choice(
        index: int,
        text: str,
        finish_reason: str | None,
        logprobs: list[TokenLogprob],
        chat: bool,
        generation: GenerationRequest,
        streamed: bool = False,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason}
        if chat:
            choice["delta" if streamed else "message"] = (
                {"content": text} if streamed else {"role": "assistant", "content": text}
            )
            choice["logprobs"] = (
                {"content": [_chat_logprob(t, generation.top_logprobs) for t in logprobs]}
                if generation.logprobs
                else None
            )
        else:
            choice["text"] = text
            choice["logprobs"] = _completion_logprobs(logprobs) if generation.logprobs else None
        return choice

    def _token(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def _chat_logprob(token: TokenLogprob, top: int) -> dict[str, Any]:
        text = _token(token.token_id)
        return {
            "token": text,
            "logprob": token.logprob,
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": _token(i), "logprob": lp, "bytes": list(_token(i).encode())} for i, lp in token.top[:top]
            ],
        }

    def _completion_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
        return {
            "tokens": [_token(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token(i): lp for i, lp in t.top} for t in tokens],
            "text_offset": [],
        }

    return app


def _usage(handle: RequestHandle) -> dict[str, int]:
    return {
        "prompt_tokens": handle.prompt_tokens,
        "completion_tokens": handle.completion_tokens,
        "total_tokens": handle.prompt_tokens + handle.completion_tokens,
    }


def _sse(answer_id: str, kind: str, model: str, choices: list[dict[str, Any]], include_usage: bool) -> str:
    chunk: dict[str, Any] = {
        "id": answer_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if include_usage:  # OpenAI: every chunk carries usage null when the last one carries the totals
        chunk["usage"] = None
    return "data: " + json.dumps(chunk) + "\n\n"


def serve(parts: ServerParts, host: str, port: int, log: Callable[[str], None]) -> int:
    """Run until SIGTERM/SIGINT (uvicorn finishes open requests first); 0 on a clean stop."""
    import uvicorn

    config = uvicorn.Config(parts.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the handler that was
    # there before it: with the default one the process would die by the signal after a clean stop. The stop is
    # the intended end, so the signal, raised again, is only acknowledged.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda number, frame: None)
    adapters = len(parts.registry.adapters())
    log(f"serving {parts.base_name} on http://{host}:{port}/v1 ({adapters} adapter{'s' if adapters != 1 else ''})")
    server.run()
    return 0
