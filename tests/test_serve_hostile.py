"""Hostile input against a live server (loopback): hypothesis-generated /v1/chat/completions bodies.

Each field of the app's own request schema (FastAPI's OpenAPI document, read from the app) gets either a
plausible value or junk (wrong types, huge and non-finite numbers, surrogates and control characters,
nested lists and objects), plus whole bodies that are not an object at all. The claim: no answer is a 500
(nor an error event inside a stream), no body holds a traceback, the worker never fails a batch, the server
still answers /healthz at the end, and its memory stays bounded. Bounded in time: ~150 examples on a copying
bigram Llama (test_serve_decoding) served plain and grounded on a real FAQ index, 16 tokens at most each.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import request
from test_serve_decoding import copy_model

from faqtune.errors import FaqtuneError

EXAMPLES = int(os.environ.get("FAQTUNE_HOSTILE_EXAMPLES", "150"))  # more, and random, when set (exploring)
RSS_GROWTH_MB = 250  # hypothesis, tokenizers and the embedder's caches included


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def hostile_server(tiny_tokenizer, tmp_path_factory):
    from faqtune.config import FaqtuneConfig, GenerationConfig
    from faqtune.data import FaqEntry
    from faqtune.generate import Answerer
    from faqtune.grounding import GroundedAnswerer
    from faqtune.retrieval import FaqIndex
    from faqtune.serve.app import create_app
    from faqtune.serve.engine import ServedModel, ServedModels
    from faqtune.serve.http import ServeLimits, ServerThread, allowed_hosts_for

    model = copy_model(tiny_tokenizer)
    rows = [(f"How do I do thing number {i}?", f"Thing {i} is done on page {i}.") for i in range(8)]
    index = FaqIndex.build([FaqEntry((("user", q), ("assistant", a))) for q, a in rows],
                           tmp_path_factory.mktemp("hostile-index"), threshold=0.3)
    cfg = FaqtuneConfig()
    entries = {"copy": ServedModel("copy", Answerer(model, tiny_tokenizer, GenerationConfig()), None,
                                   tiny_tokenizer, 512),
               "grounded": ServedModel("grounded", GroundedAnswerer(model, tiny_tokenizer, cfg.generation,
                                                                    None, index, cfg), "x", tiny_tokenizer, 512)}
    limits = ServeLimits(max_tokens_cap=16, max_messages=8, max_body_bytes=50_000, max_prompt_tokens=400)
    app = create_app(ServedModels(entries), limits, allowed_hosts=allowed_hosts_for("127.0.0.1"))
    with ServerThread(app, limits=limits) as url:
        yield url, app


# --- strategies --------------------------------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, categories=None), max_size=40)  # surrogates, controls, all planes
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | any_text
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5e-324, 1e-300, 0.0]))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
                    max_leaves=12)
roles = st.sampled_from(["user", "system", "developer", "assistant", "tool", "", "USER"]) | any_text
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | junk, "text": any_text | junk})
content = any_text | st.sampled_from(["How do I do thing number 3?", "", " ", "\x00", "page " * 60]) \
    | st.lists(part, max_size=3) | junk
message = st.fixed_dictionaries({"role": roles, "content": content}, optional={"name": junk, "tool_calls": junk})
VALUES = {  # a plausible value or junk, for each field of the request schema
    "messages": st.lists(message, min_size=0, max_size=9) | junk,
    "model": st.sampled_from(["copy", "grounded", "", "gpt-4o"]) | any_text | junk,
    "max_tokens": st.integers(-5, 40) | st.integers(-(2**80), 2**80) | junk,
    "max_completion_tokens": st.integers(-5, 40) | junk,
    "temperature": st.floats(-1, 3) | st.floats(allow_nan=True, allow_infinity=True) | junk,
    "top_p": st.floats(-1, 2) | junk,
    "stop": any_text | st.lists(any_text, max_size=6) | junk,
    "n": st.integers(-2, 10) | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
}


def request_fields(app) -> list[str]:
    """The request body's fields, from the app's own OpenAPI document."""
    schema = app.app.openapi()
    ref = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return sorted(schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]["properties"])


PLAUSIBLE = {  # values a client might well send (valid or nearly), so that examples reach the model
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": content}), min_size=1, max_size=4)
    .map(lambda ms: [*ms, {"role": "user", "content": ms[-1]["content"] if isinstance(ms[-1]["content"], str)
                           else "thing 3"}]),
    "model": st.sampled_from(["copy", "grounded"]),
    "max_tokens": st.integers(1, 16),
    "temperature": st.sampled_from([0.0, 0.7, 1e-300, 2.0]),
    "top_p": st.sampled_from([1.0, 0.5, 1e-9]),
    "stop": st.sampled_from([None, "page", ["\n", " is"]]),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stream_options": st.just({"include_usage": True}),
}


def bodies(fields: list[str]):
    """JSON bodies: plausible ones with at most one junk field, objects of junk fields, any JSON, any bytes."""
    plausible = st.fixed_dictionaries({f: PLAUSIBLE[f] for f in ("model", "messages")},
                                      optional={f: PLAUSIBLE[f] for f in fields if f in PLAUSIBLE and f not in ("model", "messages")})

    def spoil(body: dict):
        return st.sampled_from(fields).flatmap(lambda f: VALUES[f].map(lambda v: {**body, f: v}))

    objects = st.fixed_dictionaries({}, optional={**{f: VALUES[f] for f in fields}, "extra": junk})
    as_json = lambda b: json.dumps(b, allow_nan=True).encode()  # noqa: E731 (NaN, Infinity: json.loads takes them)
    return (plausible.map(as_json) | plausible.flatmap(spoil).map(as_json) | objects.map(as_json)
            | junk.map(as_json) | st.binary(max_size=64))


def test_hostile_bodies_never_get_a_500(hostile_server):
    url, app = hostile_server
    fields = request_fields(app)
    assert {"messages", "model", "max_tokens", "temperature", "stream"} <= set(fields)
    assert set(fields) <= set(VALUES), "a new request field: give it a strategy in VALUES"
    seen: dict[int, int] = {}
    request(url, body={"model": "grounded", "messages": [{"role": "user", "content": "warm up"}]}, key=None)
    start_rss, start = rss_mb(), time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize="FAQTUNE_HOSTILE_EXAMPLES" not in os.environ, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bodies(fields))
    def one(body: bytes) -> None:
        status, _, payload = request(url, body=body, key=None)
        seen[status] = seen.get(status, 0) + 1
        text = payload if isinstance(payload, str) else json.dumps(payload)
        assert status < 500, (status, body, payload)
        assert "Traceback" not in text and "internal_error" not in text, (body, text[-500:])
        if status >= 400:
            assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}

    one()
    elapsed = time.monotonic() - start
    status, _, health = request(url, "GET", "/healthz", key=None)
    assert status == 200 and health["alive"] and health["errors"] == 0, health
    assert seen.get(200, 0) >= 10 and len(seen) >= 3, seen  # the examples reached the model, and the errors
    assert rss_mb() - start_rss < RSS_GROWTH_MB, (start_rss, rss_mb())
    assert elapsed < 60 * max(1, EXAMPLES / 150), f"{elapsed:.0f} s for {EXAMPLES} examples: {seen}"
    print(f"{EXAMPLES} examples in {elapsed:.1f} s, statuses {dict(sorted(seen.items()))}, "
          f"RSS {start_rss:.0f} -> {rss_mb():.0f} MB")


header_names = st.sampled_from([b"Host", b"Content-Type", b"Authorization", b"Content-Length", b"X-Junk",
                                b"Transfer-Encoding", b"Accept"])
header_values = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in b"\r\n")) \
    | st.sampled_from([b"localhost", b"evil.example", b"application/json", b"Bearer x", b"chunked", b"-1",
                       b"99999999999999999999", b"[::1]:1"])
paths = st.sampled_from(["/", "/healthz", "/v1/models", "/v1/chat/completions", "/static/chat.js", "/static/..%2f.."]) \
    | any_text.map(lambda t: "/" + "".join(c if c.isalnum() else f"%{ord(c) % 256:02X}" for c in t))


def test_hostile_requests_never_get_a_500(hostile_server):
    """Raw HTTP: any method, path (percent-encoded junk included), headers and a small body."""
    from test_serve_requests import raw

    url, _ = hostile_server
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES // 2, deadline=None, derandomize="FAQTUNE_HOSTILE_EXAMPLES" not in os.environ,
              database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"HEAD", b"PATCH"]),
           path=paths, headers=st.lists(st.tuples(header_names, header_values), max_size=4),
           body=st.binary(max_size=40))
    def one(method, path, headers, body):
        head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (method, path.encode())
        head += b"".join(b"%s: %s\r\n" % kv for kv in headers if kv[0] != b"Host")
        answer = raw(url, head + b"Content-Length: %d\r\n\r\n" % len(body) + body, wait=10)
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        status = int(answer.split(b" ", 2)[1])
        seen[status] = seen.get(status, 0) + 1
        assert status < 500 and b"Traceback" not in answer, answer[:500]

    one()
    status, _, health = request(url, "GET", "/healthz", key=None)
    assert status == 200 and health["alive"] and health["errors"] == 0, health
    assert len(seen) >= 3, seen


def test_a_port_another_server_holds_is_one_clear_error():
    """The first server's socket was bound but not listening until uvicorn started (after the model had
    loaded), so a second `serve` on that port bound it too and failed later, in a traceback."""
    from faqtune.serve.http import bind_socket

    first = bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(FaqtuneError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            bind_socket("127.0.0.1", port).close()
    finally:
        first.close()
