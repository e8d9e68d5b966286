"""`faqtune serve`: an OpenAI-compatible chat API and a chat page over trained runs (FastAPI + uvicorn).

    POST /v1/chat/completions   OpenAI's request and response (stream: true -> server-sent events)
    GET  /v1/models             every served adapter by name, and the bare base
    GET  /v1/models/NAME        one of them
    GET  /                      a small chat page (static HTML + JS shipped in the package)
    GET  /healthz               liveness, queue and worker figures

Extra response fields: when an answer comes from an FAQ entry (grounding), its choice carries
`faqtune_citation` = {"id", "question", "score"}, and the related entries offered with it (or with a decline)
`faqtune_related` = a list of the same (both in the last chunk of a stream).

The ASGI layers, outside in: `Gate` (Host check, API key, body size and time, security headers, one log line per
request, no traceback to a client; http.py), FastAPI (routes, validation: every request is checked here,
before it is queued, so a bad one gets a 400 and never reaches a batch), and the `BatchWorker` thread that
generates (engine.py), or, with `--backend URL`, the `UpstreamWorker` that sends the grounded prompt to
an OpenAI-compatible engine (vLLM, llama.cpp's server) and streams its answer back (upstream.py). Bounds (`ServeLimits`): the queue (429), the batch, the body (413, 408), the
messages, `max_tokens`, `n`, the prompt (`max_prompt_tokens`, 2048 by default, and the model's context: 400
`context_length_exceeded`), and the time to send a request head (the connection is closed).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from faqtune.errors import FaqtuneError, is_utf8
from faqtune.prompting import encode_prompt, with_system
from faqtune.serve.engine import BatchWorker, ServedModels, load_served_models
from faqtune.serve.http import (
    INTERNAL,
    APIError,
    Gate,
    ServeLimits,
    allowed_hosts_for,
    bind_socket,
    configure_logging,
    error_body,
    error_response,
    is_loopback,
    printable,
    resolve_api_key,
    uvicorn_config,
)
from faqtune.serve.jobs import Choice, GenSettings, Job, QueueFull, Result, WorkerStopped
from faqtune.serve.upstream import Upstream, UpstreamWorker, check_backend, load_upstream_models

log = logging.getLogger("faqtune.serve")
STATIC = Path(__file__).parent / "static"
ROLES = {"system", "developer", "user", "assistant"}  # developer: OpenAI's newer name for system


# --- request schema (types checked here -> 422; values checked below -> 400) --------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat request; fields it has that a local FAQ bot cannot honour (tools, logprobs...) are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    messages: list[Message]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


def _messages(req: ChatRequest, limits: ServeLimits) -> list[dict[str, str]]:
    if not req.messages:
        raise APIError(400, "`messages` must hold at least one message", param="messages")
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(req.messages)} > {limits.max_messages}", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role {m.role!r} is not supported (system, user, assistant)",
                           param=f"messages[{i}].role")
        if m.content is None:
            raise APIError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        if not is_utf8(text):
            raise APIError(400, f"messages[{i}].content is not valid Unicode (a lone surrogate?)",
                           param=f"messages[{i}].content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if not any(m["role"] == "user" for m in out):  # a FAQ bot answers a user's question (and retrieves for it)
        raise APIError(400, "`messages` must include a user message (the question to answer)", param="messages")
    return out


GREEDY_BELOW = 1e-5  # a temperature this small samples like greedy, and divides logits into overflow


def _settings(req: ChatRequest, default_tokens: int, limits: ServeLimits, entry) -> GenSettings:
    gen = entry.answerer.gen
    temperature = gen.temperature if req.temperature is None else req.temperature
    top_p = gen.top_p if req.top_p is None else req.top_p
    if 0 < temperature < GREEDY_BELOW:
        temperature = 0.0
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    checks = [
        (not 0 <= temperature <= 2, "temperature", f"`temperature` must be between 0 and 2, got {temperature}"),
        (not 0 < top_p <= 1, "top_p", f"`top_p` must be in (0, 1], got {top_p}"),
        (not 1 <= req.n <= limits.max_n, "n", f"`n` must be between 1 and {limits.max_n}, got {req.n}"),
        (len(stop) > 4 or not all(stop), "stop", "`stop` takes up to 4 non-empty strings"),
        (not all(map(is_utf8, stop)), "stop", "`stop` is not valid Unicode (a lone surrogate?)"),
        (max_tokens is not None and max_tokens < 1, "max_tokens", f"`max_tokens` must be >= 1, got {max_tokens}"),
        (max_tokens is not None and max_tokens > limits.max_tokens_cap, "max_tokens",
         f"`max_tokens` is {max_tokens}, above this server's cap of {limits.max_tokens_cap}"),
    ]
    for bad, param, message in checks:
        if bad:
            raise APIError(400, message, param=param)
    return GenSettings(max_tokens or default_tokens, float(temperature), float(top_p), req.n, tuple(stop))


# --- responses ---------------------------------------------------------------------------------------------

def _usage(result: Result) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in result.choices)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def _grounding_fields(c: Choice) -> dict[str, Any]:
    """A choice's faqtune fields: the FAQ entry it came from and the related ones offered, each when there is one."""
    fields: dict[str, Any] = {}
    if c.source is not None:
        fields["faqtune_citation"] = c.source
    if c.related:
        fields["faqtune_related"] = list(c.related)
    return fields


def completion_body(rid: str, created: int, model: str, result: Result) -> dict[str, Any]:
    choices = []
    for c in result.choices:
        choice = {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                  "finish_reason": c.finish_reason, **_grounding_fields(c)}
        choices.append(choice)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(result)}


def _sse(obj: Any) -> bytes:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class JobStream(Response):
    """Server-sent events for one job: OpenAI chunks, `[DONE]` last; a disconnect cancels the generation."""

    media_type = "text/event-stream"

    def __init__(self, worker: BatchWorker, job: Job, rid: str, created: int, include_usage: bool):
        super().__init__(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # chunked
        self.worker, self.job, self.include_usage = worker, job, include_usage
        self.head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": job.model}

    def chunk(self, choices: list[dict], **extra) -> bytes:
        return _sse({**self.head, "choices": choices, **extra})

    async def events(self):
        n = self.job.settings.n
        yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None} for i in range(n)])
        while True:
            kind, payload = await self.job.events.get()
            if kind == "delta":
                index, text = payload
                yield self.chunk([{"index": index, "delta": {"content": text}, "logprobs": None,
                                   "finish_reason": None}])
            elif kind == "error":
                error = _error_of(payload)
                yield _sse(error_body(error.message, error.type, error.param, error.code))
                break
            elif kind == "gone":
                return
            else:
                yield from_result(self, payload)
                break
        yield b"data: [DONE]\n\n"

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            async for data in self.events():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if not watcher.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client closed the connection under a send
            pass
        finally:
            watcher.cancel()
            self.worker.cancel(self.job)  # no-op once the job finished

    async def _watch(self, receive) -> None:
        """On disconnect: cancel the generation at once, and wake the event loop above to end the response."""
        await _wait_disconnect(receive)
        self.worker.cancel(self.job)
        self.job.events.put_nowait(("gone", None))


def from_result(stream: JobStream, result: Result) -> bytes:
    """The closing chunk(s): each choice's remaining text, finish reason and citation; then usage."""
    data = b""
    for c in result.choices:
        rest = c.text[len(c.streamed):] if c.text.startswith(c.streamed) else ""
        choice = {"index": c.index, "delta": {"content": rest} if rest else {}, "logprobs": None,
                  "finish_reason": c.finish_reason, **_grounding_fields(c)}
        last = c is result.choices[-1]
        data += stream.chunk([choice], **({"usage": _usage(result)} if last else {}))
    if stream.include_usage:
        data += stream.chunk([], usage=_usage(result))
    return data


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _await_result(worker: BatchWorker, job: Job, request: Request) -> Result | None:
    """The job's result, or None when the client disconnects first (the job is then cancelled)."""
    getter = asyncio.ensure_future(_final_event(job))
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            kind, payload = getter.result()
            if kind == "error":
                raise _error_of(payload)
            return payload
        return None
    finally:
        getter.cancel()
        watcher.cancel()
        worker.cancel(job)


def _error_of(payload: Any) -> APIError:
    """A job's error event -> the client's error: an engine failure as worded (502/504), anything else 500."""
    return payload if isinstance(payload, APIError) else APIError(500, *INTERNAL)


async def _final_event(job: Job):
    while True:
        kind, payload = await job.events.get()
        if kind != "delta":
            return kind, payload


# --- the app -----------------------------------------------------------------------------------------------

def create_app(models: ServedModels, limits: ServeLimits | None = None, api_key: str | None = None,
               allowed_hosts: Iterable[str] | None = None, backend: Upstream | None = None):
    """The ASGI app serving `models`; the worker runs from startup to shutdown: in-process, or the `backend`
    engine's client (`models` then from `load_upstream_models`). `allowed_hosts`: the Host names answered (None:
    any; `serve` sets it from the bound address, see `allowed_hosts_for`)."""
    limits = limits or ServeLimits()
    worker = (BatchWorker(models, limits.queue_size, limits.max_batch_size) if backend is None
              else UpstreamWorker(models, backend, limits.queue_size, limits.max_batch_size))

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            if isinstance(worker, UpstreamWorker):
                await worker.aclose()

    app = FastAPI(title="faqtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.models = worker, models
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    created = int(time.time())
    counter = PromptCounter()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        snap = worker.snapshot()
        return JSONResponse({"status": "ok" if snap["alive"] else "down", **snap},
                            status_code=200 if snap["alive"] else 503)

    def model_card(name: str) -> dict:
        parent = None if models.entries[name].adapter is None else _base_name(models)
        return {"id": name, "object": "model", "created": created, "owned_by": "faqtune", "parent": parent}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(name) for name in models.entries]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str):  # client.models.retrieve(NAME)
        if name not in models.entries:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(models.names)}",
                           param="model", code="model_not_found")
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        name = req.model or models.names[0]
        request.scope["state"]["faqtune_model"] = name
        entry = models.entries.get(name)
        if entry is None:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(models.names)}",
                           param="model", code="model_not_found")
        messages = with_system(_messages(req, limits), entry.system_prompt)
        prompt_tokens = await counter.count(entry, messages, min(limits.max_prompt_tokens, entry.context_length))
        room = entry.context_length - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens; this model's context is "
                                f"{entry.context_length}", param="messages", code="context_length_exceeded")
        if prompt_tokens > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param="messages",
                           code="context_length_exceeded")
        settings = _settings(req, min(entry.answerer.gen.max_new_tokens, limits.max_tokens_cap, room), limits, entry)
        if settings.max_new_tokens > room:
            raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({settings.max_new_tokens}) exceed "
                                f"this model's context of {entry.context_length}", param="max_tokens",
                           code="context_length_exceeded")
        job = Job(name, messages, settings, req.stream, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({limits.queue_size} requests queued); retry in "
                                f"{e.retry_after} s", "rate_limit_error", None, "queue_full",
                           {"Retry-After": str(e.retry_after)}) from None
        except WorkerStopped:
            raise APIError(503, "the server is shutting down", "server_error", None, "unavailable") from None
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return JobStream(worker, job, rid, now, include_usage)
        result = await _await_result(worker, job, request)
        if result is None:
            return Response(status_code=499)  # nobody is listening; logged as such
        return JSONResponse(completion_body(rid, now, name, result))

    return Gate(app, api_key, limits.max_body_bytes, allowed_hosts, limits.body_timeout, limits.max_head_bytes)


class PromptCounter:
    """Prompt tokens, counted off the event loop (a long prompt takes seconds to tokenize: other clients wait
    on nothing), one at a time per model (a tokenizer is not shared across threads); a prompt whose characters
    could not fit in `limit` tokens even at the vocabulary's longest token is refused without tokenizing."""

    def __init__(self):
        self.locks: dict[str, threading.Lock] = {}
        self.chars_per_token: dict[str, int] = {}

    async def count(self, entry, messages: list[dict[str, str]], limit: int) -> int:
        if entry.name not in self.locks:
            self.locks[entry.name] = threading.Lock()
            self.chars_per_token[entry.name] = _longest_token(entry.count_tokenizer)
        chars = sum(len(m["content"]) for m in messages)
        if chars > limit * self.chars_per_token[entry.name]:
            raise APIError(400, f"the prompt ({chars} characters) is longer than {limit} tokens, this server's "
                                f"limit for it (--max-prompt-tokens, the model's context)", param="messages",
                           code="context_length_exceeded")

        def tokenize() -> int:
            with self.locks[entry.name]:
                return len(encode_prompt(entry.count_tokenizer, messages))

        return await asyncio.to_thread(tokenize)


def _longest_token(tokenizer) -> int:
    """The most characters one token can stand for: its vocabulary's longest entry (byte-level BPE writes one
    character per byte, so no decoded token is longer). Unknown: no bound."""
    try:
        return max(map(len, tokenizer.get_vocab())) or 1
    except Exception:  # noqa: BLE001 -- a stand-in tokenizer: count every prompt
        return 1 << 40


def _base_name(models: ServedModels) -> str | None:
    return next((name for name, e in models.entries.items() if e.adapter is None), None)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param,
                              code="invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, None,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, printable(request.url.path), exc_info=exc)
        return error_response(500, *INTERNAL)


# --- running it --------------------------------------------------------------------------------------------

def serve(run_specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServeLimits | None = None, allowed_hosts: Iterable[str] = (), trust_remote_code: bool = False,
          backend: Upstream | None = None) -> int:
    """Load the runs and serve them until interrupted. `allowed_hosts`: Host names answered besides the
    loopback ones (bound to loopback); bound elsewhere, when given, the only ones. `backend`: generate on that
    OpenAI-compatible engine instead of in-process (no model weights are loaded here then)."""
    import uvicorn

    limits = limits or ServeLimits()
    if not 1 <= port <= 65535:
        raise FaqtuneError(f"`--port` must be between 1 and 65535, got {port}")
    configure_logging()
    api_key = resolve_api_key(api_key)
    hosts = allowed_hosts_for(host, allowed_hosts)
    sock = bind_socket(host, port)  # before the slow part: a busy port fails at once
    if backend is None:
        models = load_served_models(run_specs, trust_remote_code)
    else:
        models = load_upstream_models(run_specs, trust_remote_code)
        check_backend(backend, models.names)
    if api_key is None and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it (--api-key)", host)
    via = "" if backend is None else f", generating on {backend.url}"
    log.info("serving %s on http://%s:%d (chat page: /, API: /v1%s)", ", ".join(models.names), host, port, via)
    app = create_app(models, limits, api_key, hosts, backend)
    uvicorn.Server(uvicorn_config(app, limits)).run(sockets=[sock])
    return 0
