"""The HTTP edge of `faqtune serve`: limits, OpenAI-shaped errors, the outermost ASGI layer, uvicorn's setup.

`Gate` wraps the FastAPI app: Host check (DNS rebinding), API key, body size and read time, security headers
on every response, one log line per request (control characters escaped), and a last net so no traceback
reaches a client. `uvicorn_config` bounds what uvicorn itself leaves open: a deadline for each request head
(`RequestHeadTimeout`, which uvicorn lacks), the idle keep-alive time and the size of a request head.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from faqtune.errors import ConfigError, FaqtuneError

log = logging.getLogger("faqtune.serve")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeLimits:
    queue_size: int = 64  # requests waiting for the worker; more get 429
    max_batch_size: int = 8  # requests answered together in one batch
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_tokens_cap: int = 1024
    max_n: int = 8
    max_prompt_tokens: int = 2048  # the rendered prompt, before retrieval adds entries (and <= the context)
    header_timeout: float = 10.0  # seconds to send a request head (from connecting, or the previous response)
    body_timeout: float = 30.0  # seconds to send a request body
    keep_alive: int = 5  # seconds an idle keep-alive connection stays open
    max_head_bytes: int = 16_384  # request line + headers

    def __post_init__(self) -> None:  # checked once, when made (the CLI makes it before any model loads)
        problems = [f"`--{k.replace('_', '-')}` must be > 0, got {v}" for k, v in vars(self).items() if not v > 0]
        if problems:
            raise ConfigError(problems)


# --- errors in OpenAI's shape ------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


INTERNAL = ("internal server error (the server log has the details)", "server_error", None, "internal_error")


def printable(text: str, limit: int = 200) -> str:
    """Client-given text for a log line: control and other unprintable characters escaped as repr() does
    (a newline in a URL cannot forge a line), cut to `limit` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


# --- Host names (DNS rebinding) ----------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """Host header names to answer: bound to loopback, the bound address and the loopback names (a web page
    on another site that resolves its own name to 127.0.0.1 is refused) plus `extra`; bound elsewhere, only
    `extra` when given, else any (None)."""
    extra = {h.strip().strip("[]").lower().rstrip(".") for h in extra if h.strip()}
    if is_loopback(host):
        return frozenset({host.strip("[]").lower(), *LOOPBACK_NAMES, *extra})
    return frozenset(extra) or None


def host_name(header: bytes) -> str:
    """A Host header's name, without port or IPv6 brackets, lower case."""
    value = header.decode("latin-1").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


# --- the outermost layer -----------------------------------------------------------------------------------

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; object-src 'none'; base-uri 'none'; "
                                 b"frame-ancestors 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Gate:
    """Host (400), API key (401), body size (413) and time (408), security headers and one log line per
    request; a last net so no trace reaches a client."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: Iterable[str] | None = None,
                 body_timeout: float = 30.0, max_head_bytes: int = 16_384):
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.max_head_bytes = max_head_bytes
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = None if allowed_hosts is None else frozenset(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), []
        state = scope.setdefault("state", {})

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            refusal = self._check_head(scope) or self._check_host(scope) or self._check_key(scope)
            if refusal is None:
                receive, refusal = await self._read_body(scope, receive)
            await (refusal or self.app)(scope, receive, send_logged)
        except Exception:
            if not status:  # the app's catch-all already answered (and logged) when a response started
                log.exception("unhandled error on %s %s", scope["method"], printable(scope["path"]))
                await error_response(500, *INTERNAL)(scope, receive, send_logged)
        finally:
            log.info("%s %s %s %.3fs model=%s", scope["method"], printable(scope["path"]),
                     status[0] if status else 499, time.perf_counter() - start,
                     printable(str(state.get("faqtune_model", "-")), 80))

    def _check_head(self, scope) -> JSONResponse | None:
        """A request head over max_head_bytes (431): h11 bounds only a head still incomplete in its buffer, so
        one that arrived in a single read (up to 64 KiB, more on a fast link) passed whole."""
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        if size <= self.max_head_bytes:
            return None
        return error_response(431, f"the request head is {size} bytes, over this server's limit of "
                                   f"{self.max_head_bytes}", code="request_header_fields_too_large")

    def _check_host(self, scope) -> JSONResponse | None:
        if self.allowed_hosts is None:
            return None
        given = dict(scope["headers"]).get(b"host")
        if given is not None and host_name(given) in self.allowed_hosts:
            return None
        return error_response(400, "this server does not answer to that Host name (DNS rebinding guard); "
                                   "allow a name with `--allowed-host NAME`", code="invalid_host")

    def _check_key(self, scope) -> JSONResponse | None:
        if self.api_key is None or not scope["path"].startswith("/v1/"):
            return None
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.api_key):
            return None
        message = "missing API key" if not given else "invalid API key"
        return error_response(401, f"{message}: send 'Authorization: Bearer KEY'", "invalid_request_error",
                              None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive):
        """Read the whole body up front (it is small), refusing it past the limit or the time; replay it."""
        too_large = error_response(413, f"request body larger than {self.max_body_bytes} bytes",
                                   "invalid_request_error", None, "request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return receive, too_large
        try:
            body = await asyncio.wait_for(self._body(receive), self.body_timeout)
        except TimeoutError:
            return receive, error_response(408, f"the request body took longer than {self.body_timeout:g} s",
                                           code="request_timeout", headers={"Connection": "close"})
        if body is None:
            return receive, too_large
        if isinstance(body, Response):
            return receive, body
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect is left

        return replay, None

    async def _body(self, receive) -> bytes | Response | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return Response(status_code=499)  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


# --- uvicorn -----------------------------------------------------------------------------------------------

class RequestHeadTimeout(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (slowloris).

    uvicorn bounds a head's size while it is incomplete (h11_max_incomplete_event_size; `Gate` checks a whole
    one) and the idle time after a response (timeout_keep_alive, which stops at the next request's first byte),
    but not the time a client takes to send a head, nor the time before the first byte on a new connection.
    This closes the connection when a head is not complete `header_timeout` seconds after connecting or after
    the previous response.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.header_timeout = getattr(config, "faqtune_header_timeout", 10.0)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, limits: ServeLimits):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            http=RequestHeadTimeout, timeout_keep_alive=limits.keep_alive,
                            h11_max_incomplete_event_size=limits.max_head_bytes)
    config.faqtune_header_timeout = limits.header_timeout
    return config


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, or one clear error (address in use, unknown host...)."""
    if not 0 <= port <= 65535:
        raise FaqtuneError(f"`--port` must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # here, not in uvicorn: a port another server holds is this one line, not a traceback
    except OSError as e:
        raise FaqtuneError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class ServerThread:
    """A uvicorn server on a background thread (tests, benchmarks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limits: ServeLimits | None = None):
        import uvicorn

        self.sock = bind_socket(host, port)  # port 0: a free port, known before the server starts
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, limits or ServeLimits()))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def resolve_api_key(given: str | None) -> str | None:
    """--api-key, else $FAQTUNE_API_KEY, else none (no key asked)."""
    return given or os.environ.get("FAQTUNE_API_KEY") or None


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each line (tests and tools swap it), like logging's last resort."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging() -> None:
    """One line per request (and warnings) on stderr, for `faqtune serve`."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
