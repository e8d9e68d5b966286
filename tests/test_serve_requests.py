"""Issue 15's request-level findings on a live server (loopback): a failing request in a batch, the health
counters, the prompt bound, odd numbers and strings, the log line, Host names, headers, slow clients.

The model is test_serve_decoding's copying bigram Llama (built in a second, answers SENTENCE); "gated" is the
same model behind an answerer that holds a request until the test lets it go (so others queue up behind it
and form one batch) and fails on a poisoned one, like retrieval failing on one odd conversation.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from test_serve import request
from test_serve_decoding import SENTENCE, copy_model

from faqtune.generate import Answerer

LIMITS = dict(max_prompt_tokens=64, header_timeout=1.0, body_timeout=1.0, max_batch_size=8)


class GatedAnswerer(Answerer):
    """Holds a batch holding "hold" until `release` is set; fails any batch holding "boom" before generating,
    and any holding "late" after (its rows streamed meanwhile)."""

    release = threading.Event()

    def prepare(self, conversations):
        text = json.dumps(conversations)
        if "hold" in text:
            self.release.wait(20)
        if "boom" in text:
            raise RuntimeError("secret internals: boom")
        return [(c, "late" in json.dumps(c)) for c in conversations]

    def finish(self, answer, late):
        if late:
            raise RuntimeError("secret internals: late")
        return answer


@pytest.fixture(scope="module")
def app_server(tiny_tokenizer):
    from faqtune.config import GenerationConfig
    from faqtune.serve.app import create_app
    from faqtune.serve.engine import ServedModel, ServedModels
    from faqtune.serve.http import ServeLimits, ServerThread, allowed_hosts_for

    model = copy_model(tiny_tokenizer)
    entries = {"copy": ServedModel("copy", Answerer(model, tiny_tokenizer, GenerationConfig()), None,
                                   tiny_tokenizer, 512),
               "gated": ServedModel("gated", GatedAnswerer(model, tiny_tokenizer, GenerationConfig()), None,
                                    tiny_tokenizer, 512)}
    limits = ServeLimits(**LIMITS)
    app = create_app(ServedModels(entries), limits, allowed_hosts=allowed_hosts_for(
        "127.0.0.1", ["faq.example"]))
    with ServerThread(app, limits=limits) as url:
        yield url


def ask(url: str, content: str = "When can I return it?", **kw):
    return request(url, body={"model": "copy", "messages": [{"role": "user", "content": content}], **kw}, key=None)


def health(url: str) -> dict:
    return request(url, "GET", "/healthz", key=None)[2]


def wait_for(predicate, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def assert_openai_error(status: int, payload, expected: int, code: str | None = None) -> None:
    assert status == expected, payload
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
    assert payload["error"]["message"] and "Traceback" not in json.dumps(payload)
    if code:
        assert payload["error"]["code"] == code, payload


# --- 2: one bad request fails only itself ------------------------------------------------------------------

def stream_text(sse: str) -> str:
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


@pytest.mark.parametrize("poison", ["boom goes this one", "late goes this one"])
def test_one_failing_request_does_not_fail_its_batch(app_server, poison):
    """A request failing before generation (boom) or after it (late: the others' rows have streamed text
    by then, which their answers alone must continue, not repeat)."""
    GatedAnswerer.release.clear()
    results: dict[str, tuple] = {}

    def one(content: str, stream: bool = False):
        body = {"model": "gated", "messages": [{"role": "user", "content": content}], "stream": stream}
        results[content] = request(app_server, body=body, key=None)

    first = threading.Thread(target=one, args=("hold the worker",))
    first.start()
    wait_for(lambda: health(app_server)["busy"])
    batch = ["a good question", poison, "another good one", "a streamed one"]
    threads = [threading.Thread(target=one, args=(c, c.endswith("streamed one"))) for c in batch]
    for t in threads:
        t.start()
    wait_for(lambda: health(app_server)["queued"] == len(batch))
    before = health(app_server)
    GatedAnswerer.release.set()
    for t in [first, *threads]:
        t.join()
    status, _, payload = results.pop(poison)
    assert_openai_error(status, payload, 500, "internal_error")
    assert "secret" not in json.dumps(payload)
    streamed = results.pop("a streamed one")
    assert streamed[0] == 200 and stream_text(streamed[2]) == SENTENCE, streamed
    for content, (status, _, body) in results.items():
        assert status == 200 and body["choices"][0]["message"]["content"] == SENTENCE, content
    wait_for(lambda: not health(app_server)["busy"])  # the worker counts a batch once its answers are out
    after = health(app_server)
    assert after["largest_batch"] >= len(batch) and after["errors"] == before["errors"] + 1 and after["alive"]


def test_healthz_counts_answered_requests_as_completed_not_cancelled(app_server):
    wait_for(lambda: not health(app_server)["busy"])
    before = health(app_server)
    for stream in (False, True, False, True, False):
        assert ask(app_server, stream=stream)[0] == 200
    wait_for(lambda: not health(app_server)["busy"])
    after = health(app_server)
    assert after["completed"] == before["completed"] + 5
    assert after["cancelled"] == before["cancelled"]


# --- 3, 5: bounds and odd values -----------------------------------------------------------------------------

def test_prompt_above_max_prompt_tokens_is_refused_before_queueing(app_server):
    before = health(app_server)["batches"]
    status, _, payload = ask(app_server, "word " * 100)
    assert_openai_error(status, payload, 400, "context_length_exceeded")
    assert payload["error"]["param"] == "messages" and "64" in payload["error"]["message"]
    assert health(app_server)["batches"] == before  # never queued
    assert ask(app_server, "word " * 10)[0] == 200
    status, _, payload = ask(app_server, "x" * 900_000)  # refused by its length, before tokenizing it
    assert_openai_error(status, payload, 400, "context_length_exceeded")
    assert "900000 characters" in payload["error"]["message"]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_tiny_temperatures_answer_greedily(app_server, temperature):
    status, _, body = ask(app_server, temperature=temperature, n=2)
    assert status == 200, body
    assert [c["message"]["content"] for c in body["choices"]] == [SENTENCE, SENTENCE]


SURROGATES = [
    b'{"model": "copy", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "copy", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
    b'{"model": "copy", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
]


@pytest.mark.parametrize("body", SURROGATES)
def test_lone_surrogates_are_a_400(app_server, body):
    status, _, payload = request(app_server, body=body, key=None)
    assert_openai_error(status, payload, 400)


def test_a_surrogate_in_names_is_no_500(app_server):
    body = b'{"model": "\\ud800\\n", "messages": [{"role": "\\udc00", "content": "hi"}]}'
    status, _, payload = request(app_server, body=body, key=None)
    assert_openai_error(status, payload, 404, "model_not_found")
    body = b'{"model": "copy", "messages": [{"role": "\\udc00", "content": "hi"}]}'
    status, _, payload = request(app_server, body=body, key=None)
    assert_openai_error(status, payload, 400)


def test_log_lines_escape_control_characters(app_server, caplog):
    caplog.set_level(logging.INFO, logger="faqtune.serve")
    forged = "\n2026-01-01 00:00:00,000 INFO GET /admin 200 0.001s model=root"
    request(app_server, "GET", "/v1/x%0A2026-01-01%2000:00:00,000%20INFO%20GET%20/admin", key=None)
    request(app_server, body={"model": forged, "messages": [{"role": "user", "content": "hi"}]}, key=None)
    request(app_server, "GET", "/healthz", key=None)
    wait_for(lambda: "GET /healthz" in caplog.text, 5)
    lines = [r.getMessage() for r in caplog.records if r.name == "faqtune.serve"]
    assert all("\n" not in line and "\r" not in line for line in lines), lines
    assert any(line.startswith("GET /v1/x\\n2026-01-01 00:00:00,000 INFO GET /admin 404 ") for line in lines)
    assert any("model=\\n2026-01-01" in line for line in lines), lines


# --- 5: Host names, headers, slow clients --------------------------------------------------------------------

def raw(url: str, data: bytes, wait: float = 10.0) -> bytes:
    """Send bytes as they are; what comes back until the server closes (or `wait` passes)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            out += b"<still open>"
    return out


@pytest.mark.parametrize("host,ok", [("evil.example", False), ("evil.example:80", False), ("127.0.0.2", False),
                                     ("localhost", True), ("LOCALHOST:8000", True), ("127.0.0.1", True),
                                     ("[::1]:8000", True), ("faq.example", True), (None, False)])
def test_host_header_is_checked_on_loopback(app_server, host, ok):
    head = b"GET /healthz HTTP/1.1\r\nConnection: close\r\n"
    if host is not None:
        head += b"Host: " + host.encode() + b"\r\n"
    if host is None:
        head = head.replace(b"HTTP/1.1", b"HTTP/1.0")  # HTTP/1.1 requires a Host (h11 refuses it first)
    answer = raw(app_server, head + b"\r\n")
    status = int(answer.split(b" ", 2)[1])
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    if ok:
        assert status == 200 and body["alive"], answer
    else:
        assert_openai_error(status, body, 400, "invalid_host")


@pytest.mark.parametrize("size,status", [(15_000, 200), (17_000, 431), (60_000, 431)])
def test_a_request_head_is_bounded_as_documented(app_server, size, status):
    """h11 bounds a head only while it is incomplete in its buffer: one that came in one read (60 KB here)
    was answered, past the documented 16 KiB."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Junk: " + b"a" * size + b"\r\n\r\n"
    answer = raw(app_server, head)
    assert int(answer.split(b" ", 2)[1]) == status, answer[:200]
    if status == 431:
        assert_openai_error(status, json.loads(answer.partition(b"\r\n\r\n")[2]), 431,
                            "request_header_fields_too_large")


def test_allowed_hosts_default_by_bound_address():
    from faqtune.serve.http import allowed_hosts_for

    assert allowed_hosts_for("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts_for("::1", ["Bot.Example."]) == {"127.0.0.1", "localhost", "::1", "bot.example"}
    assert allowed_hosts_for("0.0.0.0") is None  # reachable by name from elsewhere: any, unless given
    assert allowed_hosts_for("0.0.0.0", ["bot.example"]) == {"bot.example"}


def test_page_has_security_headers_and_no_inline_script(app_server):
    status, headers, page = request(app_server, "GET", "/", key=None)
    assert status == 200
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and all("src=" in s for s in scripts)  # CSP 'self' runs no inline script
    assert not re.search(r"<style|\son\w+=|\sstyle=", page)
    for path in ("/static/chat.js", "/v1/models", "/nowhere"):
        assert request(app_server, "GET", path, key=None)[1]["x-content-type-options"] == "nosniff"


def test_slow_request_heads_and_bodies_are_cut(app_server):
    start = time.monotonic()
    assert raw(app_server, b"") == b""  # connected, sent nothing: closed after header_timeout (1 s)
    assert raw(app_server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a") == b""
    assert time.monotonic() - start < 6
    body = b'{"model": "copy", "messages": ['
    answer = raw(app_server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 200\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert_openai_error(408, json.loads(answer.partition(b"\r\n\r\n")[2]), 408, "request_timeout")
    conn = http.client.HTTPConnection(*urlsplit(app_server).netloc.split(":"), timeout=10)
    conn.request("GET", "/healthz")  # a normal client on a keep-alive connection is unaffected
    assert conn.getresponse().read() and conn.sock is not None
    conn.close()
