"""`faqtune serve --backend URL` against a small fake OpenAI-compatible engine written here (fast, always runs):
the prompt it is sent (the grounded conversation in the run's chat template, the run's name as `model`),
declines that never reach it, citations, streaming, the engine's key, cancellation on disconnect, the bound
queue, and every engine failure (down, timeout, 500, malformed or truncated stream) as an OpenAI-style error.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from test_serve import request

from faqtune.config import FaqtuneConfig, GenerationConfig
from faqtune.generate import Answerer
from faqtune.grounding import GroundedAnswerer
from faqtune.prompting import render
from faqtune.retrieval import Hit

KEY = "client-key"
ENGINE_KEY = "engine-key"
ENTRY = Hit(7, "How do I return an item?", "Returns are free within 30 days.", 0.9)
ANSWER = "Returns are free within 30 days of delivery."


class FakeIndex:
    """Retrieval without a model: "return" questions find ENTRY (score 0.9), anything else scores 0.1."""

    threshold = 0.5

    def search_many(self, queries, k=1, hybrid=False):
        return [[ENTRY if "return" in q.lower() else Hit(1, "Do you ship?", "We ship.", 0.1)] for q in queries]

    def __len__(self):
        return 1


class Engine(BaseHTTPRequestHandler):
    """The fake engine. `mode` (class attribute) picks its behaviour; every request body is recorded."""

    mode = "ok"
    requests: list[dict] = []
    aborted = threading.Event()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "bot"}, {"id": "plain"}]})

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["_auth"] = self.headers.get("Authorization")
        body["_path"] = self.path
        type(self).requests.append(body)
        mode = type(self).mode
        if mode == "500":
            return self._json(500, {"error": {"message": "CUDA out of memory", "type": "server_error"}})
        if mode == "slow":
            time.sleep(3)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        if mode == "malformed":
            return self._send(b"data: {not json\n\n")
        pieces = (FaqtuneConfig().grounding.decline_message if mode == "decline" else ANSWER).split(" ")
        try:
            for i, word in enumerate(pieces):
                last = i == len(pieces) - 1
                if mode == "truncated" and last:
                    return
                if mode == "mid-error" and i == 2:
                    return self._send(b'data: {"error": {"message": "engine crashed"}}\n\n')
                if mode == "paced":
                    time.sleep(0.15)
                if mode == "endless":  # never finishes
                    time.sleep(0.05)
                    word, last = "more", False
                    if i == len(pieces) - 2:
                        pieces.extend(["x"] * 200)
                text = word if i == 0 else " " + word
                for index in range(body.get("n", 1)):
                    chunk = {"choices": [{"index": index, "text": text, "finish_reason": "stop" if last else None}]}
                    self._send(f"data: {json.dumps(chunk)}\n\n".encode())
            self._send(b"data: [DONE]\n\n")
        except OSError:
            type(self).aborted.set()

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


@pytest.fixture(scope="module")
def engine():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture
def mode():
    Engine.requests.clear()
    Engine.aborted.clear()

    def set_mode(name: str):
        Engine.mode = name

    set_mode("ok")
    yield set_mode
    Engine.mode = "ok"


def served_models(tokenizer):
    from faqtune.serve.engine import ServedModel, ServedModels

    cfg = FaqtuneConfig()
    grounded = GroundedAnswerer(None, tokenizer, GenerationConfig(max_new_tokens=32), None, FakeIndex(), cfg)
    plain = Answerer(None, tokenizer, GenerationConfig(max_new_tokens=32))
    return ServedModels({"bot": ServedModel("bot", grounded, "bot", tokenizer, 512),
                         "plain": ServedModel("plain", plain, None, tokenizer, 512)})


def start(tokenizer, url: str, timeout: float = 30.0, **limits):
    from faqtune.serve.app import create_app
    from faqtune.serve.http import ServeLimits, ServerThread
    from faqtune.serve.upstream import Upstream

    limits = ServeLimits(**limits)
    app = create_app(served_models(tokenizer), limits, api_key=KEY,
                     backend=Upstream(url, ENGINE_KEY, timeout=timeout, connect_timeout=2))
    return ServerThread(app, limits=limits)


@pytest.fixture(scope="module")
def front(tiny_tokenizer, engine):
    with start(tiny_tokenizer, engine, timeout=1.0) as url:
        yield url


def ask(url: str, content: str = "how do i return an item", model: str = "bot", **kw):
    return request(url, body={"model": model, "messages": [{"role": "user", "content": content}], **kw}, key=KEY)


def stream(url: str, content: str = "how do i return an item", model: str = "bot", **extra) -> list:
    """The parsed chunks of a streamed answer (an error chunk as its dict), `[DONE]` as the string."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": content}], **extra}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    out = []
    while line := response.readline():
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            out.append(data if data == "[DONE]" else json.loads(data))
    conn.close()
    return out


def test_grounded_prompt_goes_to_the_engine_and_the_answer_is_cited(front, mode, tiny_tokenizer):
    status, _, body = ask(front)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["message"]["content"] == ANSWER and choice["finish_reason"] == "stop"
    assert choice["faqtune_citation"]["id"] == ENTRY.id and choice["faqtune_citation"]["score"] == 0.9
    assert body["model"] == "bot" and body["usage"]["completion_tokens"] > 0
    [sent] = Engine.requests
    assert sent["_path"] == "/v1/completions" and sent["model"] == "bot" and sent["stream"] is True
    assert sent["_auth"] == f"Bearer {ENGINE_KEY}" and sent["temperature"] == 0 and sent["n"] == 1
    assert sent["repeat_penalty"] == sent["repetition_penalty"] == 1.0  # llama.cpp's default would be 1.1
    grounded = GroundedAnswerer(None, tiny_tokenizer, GenerationConfig(), None, FakeIndex(), FaqtuneConfig())
    conv, _ = grounded.prepare([[{"role": "user", "content": "how do i return an item"}]])[0]
    assert sent["prompt"] == render(tiny_tokenizer, conv, add_generation_prompt=True)
    assert ENTRY.answer in sent["prompt"] and sent["prompt"].endswith("<|im_start|>assistant\n")
    assert body["usage"]["prompt_tokens"] == len(tiny_tokenizer(sent["prompt"])["input_ids"])


def test_a_question_below_the_threshold_is_declined_without_calling_the_engine(front, mode):
    status, _, body = ask(front, "what is the capital of peru")
    assert status == 200
    assert body["choices"][0]["message"]["content"] == FaqtuneConfig().grounding.decline_message
    assert "faqtune_citation" not in body["choices"][0] and Engine.requests == []


def test_stream_equals_the_whole_answer_and_carries_the_citation(front, mode):
    chunks = stream(front)
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
    assert text == ANSWER
    deltas = [c for c in chunks[1:-1] if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(deltas) > 3  # streamed as it came, not in one piece at the end
    assert chunks[-2]["choices"][0]["faqtune_citation"]["id"] == ENTRY.id
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_model_decline_of_an_in_scope_question_is_replaced_by_the_entry_streamed_or_not(front, mode):
    mode("decline")  # grounding.fallback: the top entry verbatim, and the stream never shows the decline
    status, _, body = ask(front)
    assert status == 200 and body["choices"][0]["message"]["content"] == ENTRY.answer
    assert body["choices"][0]["faqtune_citation"]["verbatim"] is True
    chunks = stream(front)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"]) == ENTRY.answer


def test_request_settings_reach_the_engine(front, mode):
    status, _, body = ask(front, model="plain", temperature=0.7, top_p=0.9, n=2, stop=["30"], max_tokens=20)
    assert status == 200, body
    [sent] = Engine.requests
    assert (sent["model"], sent["temperature"], sent["top_p"], sent["n"], sent["stop"], sent["max_tokens"]) == \
        ("plain", 0.7, 0.9, 2, ["30"], 20)
    assert sent["prompt"].count("<|im_start|>user") == 1 and "Returns are free" not in sent["prompt"]
    # cut at the stop string (a real engine stops there itself; the fake does not)
    assert body["choices"][0]["message"]["content"].rstrip() == "Returns are free within"


def test_greedy_n_is_one_engine_answer_replicated(front, mode):
    status, _, body = ask(front, n=3)
    assert status == 200 and [c["message"]["content"] for c in body["choices"]] == [ANSWER] * 3
    assert Engine.requests[0]["n"] == 1


@pytest.mark.parametrize("engine_mode, status, code, words", [
    ("500", 502, "backend_error", "answered 500: CUDA out of memory"),
    ("slow", 504, "backend_timeout", "did not answer within 1 s"),
    ("malformed", 502, "backend_bad_response", "malformed stream"),
    ("truncated", 502, "backend_bad_response", "ended before the answer did"),
    ("mid-error", 502, "backend_error", "engine crashed"),
])
def test_engine_failures_are_openai_errors(front, mode, engine_mode, status, code, words):
    mode(engine_mode)
    got, _, body = ask(front)
    assert got == status, body
    error = body["error"]
    assert error["code"] == code and words in error["message"] and error["type"] == "server_error"
    assert "Traceback" not in json.dumps(body)


def test_an_engine_failure_mid_stream_ends_the_stream_with_the_error(front, mode):
    mode("mid-error")
    chunks = stream(front)
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "backend_error"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-2] if c.get("choices")) \
        .startswith("Returns")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_engine_that_is_down_is_a_502_and_health_says_where(tiny_tokenizer):
    down = f"http://127.0.0.1:{_free_port()}/v1"
    with start(tiny_tokenizer, down) as url:
        status, _, body = ask(url)
        assert status == 502 and body["error"]["code"] == "backend_unavailable", body
        assert down in body["error"]["message"]
        snap = request(url, "GET", "/healthz", key=None)[2]
        assert snap["backend"] == down and snap["backend_errors"] == 1 and snap["alive"]
        status, _, body = ask(url, "what is the capital of peru")  # a decline needs no engine
        assert status == 200


def test_the_client_key_is_still_required(front, mode):
    status, _, body = request(front, body={"messages": [{"role": "user", "content": "return?"}]}, key=None)
    assert status == 401 and Engine.requests == []


def test_a_client_that_disconnects_closes_the_engine_stream(front, mode):
    mode("endless")
    parts = urlsplit(front)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = {"model": "bot", "stream": True, "max_tokens": 400,
            "messages": [{"role": "user", "content": "how do i return an item"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    while b"more" not in response.readline():  # the answer is streaming
        pass
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert Engine.aborted.wait(10), "the engine kept generating for a client that had gone"
    snap = request(front, "GET", "/healthz", key=None)[2]
    assert snap["cancelled"] >= 1 and snap["in_flight"] == 0


def test_the_queue_is_bounded(tiny_tokenizer, engine, mode):
    mode("paced")
    with start(tiny_tokenizer, engine, queue_size=1, max_batch_size=1) as url:
        results: list[int] = []

        def one():
            results.append(ask(url, max_tokens=30)[0])

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(60)
        # one in flight, one waiting for its slot, the rest refused
        assert sorted(results) == [200, 200, 429, 429], results


def test_backend_url_and_timeout_are_checked():
    from faqtune.errors import ModelError
    from faqtune.serve.upstream import Upstream

    with pytest.raises(ModelError, match="http:// or https://.*\n.*must be > 0"):
        Upstream("127.0.0.1:8001", timeout=0)
    assert Upstream("http://h:1/v1/").url == "http://h:1/v1"


def test_check_backend_names_missing_models(engine, caplog):
    from faqtune.serve.upstream import Upstream, check_backend

    assert check_backend(Upstream(engine), ["bot", "plain"]) == []
    assert check_backend(Upstream(engine), ["bot", "other"]) == ["not listed by the backend: other"]
    down = check_backend(Upstream(f"http://127.0.0.1:{_free_port()}/v1", connect_timeout=1), ["bot"])
    assert len(down) == 1 and "did not list its models" in down[0]
