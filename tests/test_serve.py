"""`faqtune serve` on a live uvicorn server (loopback, a free port): the official OpenAI client, raw HTTP for
every error, the queue bound, disconnects, and the chat page in headless Chromium.

Two adapters on one tiny 4-bit base: one run trained 2 steps in the fixture ("alpha"), and a second run
folder ("second") holding the same run's step-1 checkpoint as its adapter.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import thing_rows, write_faq

from faqtune.cli import main

KEY = "test-key"
QUESTION = "How do I do thing number 3?"


@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory) -> tuple[Path, Path]:
    faq = write_faq(tmp_path_factory.mktemp("serve-faq") / "faq.json", thing_rows(8))
    root = tmp_path_factory.mktemp("serve-runs")
    alpha = tiny_runs("--train.max_steps", "2", "--train.save_steps", "1", "--train.warmup_ratio", "0",
                      "--train.learning_rate", "0.05", "--lora.r", "4", "--data.eval_fraction", "0",
                      # three entries in the prompt: with one, the random tiny base's first token is EOS and the
                      # three served models all answer "" (the tests compare their answers)
                      "--grounding.top_k", "3",
                      "--data.mix", "",  # the FAQ alone: with the general mix steps 1 and 2 answer alike
                      faq=faq, name="alpha")
    second = root / "second-run"
    shutil.copytree(alpha, second, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(alpha / "checkpoints" / "checkpoint-1" / name, second / "adapter" / name)
    return alpha, second


@pytest.fixture(scope="module")
def served(runs):
    from faqtune.serve.engine import load_served_models

    alpha, second = runs
    return load_served_models([str(alpha), f"second={second}"])


LIMITS = dict(queue_size=16, max_batch_size=8, max_body_bytes=20_000, max_messages=8, max_tokens_cap=500)


@pytest.fixture(scope="module")
def server(served):
    from faqtune.serve.app import create_app
    from faqtune.serve.http import ServeLimits, ServerThread

    with ServerThread(create_app(served, ServeLimits(**LIMITS), api_key=KEY)) as url:
        yield url


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def request(url: str, method: str = "POST", path: str = "/v1/chat/completions", body=None, key: str | None = KEY):
    """Raw HTTP: (status, headers (lower-case names), parsed JSON body or text)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def ask_body(**kw) -> dict:
    return {"model": "alpha", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, **kw}


def health(url: str) -> dict:
    return request(url, "GET", "/healthz")[2]


def wait_idle(url: str, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while (snap := health(url))["busy"] or snap["queued"]:
        assert time.monotonic() < deadline, f"the worker is still busy: {snap}"
        time.sleep(0.05)
    return snap


# --- the OpenAI client -------------------------------------------------------------------------------------

def test_models_lists_adapters_and_base(client, tiny_base):
    from openai import NotFoundError

    ids = [m.id for m in client.models.list()]
    assert ids == ["alpha", "second", tiny_base.name]
    assert client.models.retrieve("second").id == "second"  # it was a 404 for every name
    with pytest.raises(NotFoundError, match="the model 'nope' does not exist; served: alpha, second"):
        client.models.retrieve("nope")


def test_chat_completion(client):
    r = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=12)
    assert r.object == "chat.completion" and r.model == "alpha" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "<|im_start|>" not in choice.message.content


def test_model_selects_the_adapter_on_the_shared_base(client, served, runs):
    """Each name answers exactly as that adapter (or the bare base) loaded alone would: the run as `faqtune
    ask` answers it (grounded on its index), the bare base plainly."""
    from dataclasses import replace

    from faqtune.config import GenerationConfig
    from faqtune.generate import Answerer
    from faqtune.grounding import make_answerer
    from faqtune.loading import load_for_inference

    got = {name: client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=16).choices[0].message.content
           for name in served.names}
    assert len(set(got.values())) == 3, got  # three different models
    assert len(served.peft_model.peft_config) == 2  # two adapters on one model, the base loaded once
    assert all(e.answerer.model is served.peft_model for e in served.entries.values())
    for name, base_only in (("second", False), (served.names[2], True)):
        model, tokenizer, cfg = load_for_inference(runs[1], base_only=base_only)
        if base_only:
            bot = Answerer(model, tokenizer, GenerationConfig(max_new_tokens=16))
        else:
            bot = make_answerer(runs[1], model, tokenizer, replace(cfg, generation=replace(cfg.generation,
                                                                                          max_new_tokens=16)))
        assert got[name] == bot.ask(QUESTION)[0].text, name


def test_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="second", messages=messages, max_tokens=20)
    chunks = list(client.chat.completions.create(model="second", messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == "second" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # streamed in pieces, not in one block
    assert "".join(deltas) == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_and_n(client, served):
    messages = [{"role": "user", "content": QUESTION}]
    answers = {name: client.chat.completions.create(model=name, messages=messages, max_tokens=24).choices[0]
               for name in served.names}
    model, text = next(((n, a.message.content) for n, a in answers.items() if len(a.message.content) > 8),
                       (None, ""))
    assert model, f"every tiny model's answer is too short to cut: {answers}"
    stop = text[4:8]
    cut = client.chat.completions.create(model=model, messages=messages, max_tokens=24, stop=[stop]).choices[0]
    assert cut.message.content == text[:text.find(stop)] and cut.finish_reason == "stop"
    greedy = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    sampled = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, n=3,
                                             temperature=1.0, top_p=0.9)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert 3 <= sampled.usage.completion_tokens <= 24


def test_concurrent_requests_are_batched(server):
    """While the worker is busy, requests with equal settings queue up and are answered in one batch."""
    wait_idle(server)
    alone = {q: request(server, body=ask_body(messages=[{"role": "user", "content": q}]))[2]
             for q in ("How do I do thing number 1?", "How do I do thing number 2?")}
    long = threading.Thread(target=request, args=(server,), kwargs={"body": ask_body(max_tokens=300)})
    long.start()
    while not health(server)["busy"]:
        time.sleep(0.01)
    results = {}

    def one(q):
        results[q] = request(server, body=ask_body(messages=[{"role": "user", "content": q}]))

    threads = [threading.Thread(target=one, args=(q,)) for q in [*alone, "Where is page 4?", "Thing 5?"]]
    for t in threads:
        t.start()
    for t in [*threads, long]:
        t.join()
    assert all(status == 200 for status, _, _ in results.values())
    assert health(server)["largest_batch"] >= 2
    for q, body in alone.items():  # left-padded in a batch, the answer is the one it gets alone
        assert results[q][2]["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]


# --- errors over raw HTTP ----------------------------------------------------------------------------------

LONG_PROMPT = "thing " * 700  # ~700 tokens > the tiny model's 512 context, under the 20 kB body limit
ERRORS = [
    ("no key", ask_body(), {"key": None}, 401, "invalid_api_key"),
    ("wrong key", ask_body(), {"key": "nope"}, 401, "invalid_api_key"),
    ("body too large", b"{" + b" " * 30_000 + b"}", {}, 413, "request_too_large"),
    ("bad JSON", b'{"model": "alpha", "messages": [', {}, 400, "invalid_json"),
    ("messages not a list", ask_body(messages="hi"), {}, 422, "invalid_type"),
    ("n a string", ask_body(n="2"), {}, 422, "invalid_type"),
    ("content a number", ask_body(messages=[{"role": "user", "content": 3}]), {}, 422, "invalid_type"),
    ("too many messages", ask_body(messages=[{"role": "user", "content": "hi"}] * 9), {}, 400, None),
    ("no messages", ask_body(messages=[]), {}, 400, None),
    ("unknown role", ask_body(messages=[{"role": "wizard", "content": "hi"}]), {}, 400, None),
    ("no user message: system only", ask_body(messages=[{"role": "system", "content": "hi"}]), {}, 400, None),
    ("no user message: assistant only", ask_body(messages=[{"role": "assistant", "content": "hi"}]), {}, 400,
     None),
    ("prompt too long", ask_body(messages=[{"role": "user", "content": LONG_PROMPT}]), {}, 400,
     "context_length_exceeded"),
    ("prompt + max_tokens too long", ask_body(max_tokens=500), {}, 400, "context_length_exceeded"),
    ("max_tokens above the cap", ask_body(max_tokens=501), {}, 400, None),
    ("max_tokens zero", ask_body(max_tokens=0), {}, 400, None),
    ("temperature out of range", ask_body(temperature=3.0), {}, 400, None),
    ("n above the limit", ask_body(n=9), {}, 400, None),
    ("unknown model", ask_body(model="gpt-9"), {}, 404, "model_not_found"),
]


@pytest.mark.parametrize("what,body,kw,status,code", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_in_openai_shape(server, what, body, kw, status, code):
    got, _, payload = request(server, body=body, **kw)
    assert got == status, payload
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"] and "Traceback" not in json.dumps(payload)
    if code:
        assert payload["error"]["code"] == code


def test_other_routes_errors_and_key_scope(server):
    assert request(server, "GET", "/v1/models", key=None)[0] == 401
    status, _, payload = request(server, "GET", "/v1/models", key="x" * 200)
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    status, _, payload = request(server, "GET", "/nowhere")
    assert status == 404 and set(payload["error"]) == {"message", "type", "param", "code"}
    assert request(server, "GET", "/v1/chat/completions")[0] == 405
    assert request(server, "GET", "/healthz", key=None)[0] == 200  # liveness and the page need no key
    assert request(server, "GET", "/", key=None)[0] == 200


def test_api_key_from_env_and_comparison(monkeypatch):
    from faqtune.serve.http import Gate, resolve_api_key

    monkeypatch.setenv("FAQTUNE_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("given") == "given"
    monkeypatch.setenv("FAQTUNE_API_KEY", "")
    assert resolve_api_key(None) is None
    gate = Gate(None, "k3y", 100)
    assert gate._check_key({"path": "/v1/models", "headers": [(b"authorization", b"Bearer k3y")]}) is None
    assert gate._check_key({"path": "/v1/models", "headers": [(b"authorization", b"Bearer k3")]}) is not None
    assert gate._check_key({"path": "/healthz", "headers": []}) is None


def test_full_queue_answers_429_with_retry_after(served):
    from faqtune.serve.app import create_app
    from faqtune.serve.http import ServeLimits, ServerThread

    limits = ServeLimits(**{**LIMITS, "queue_size": 1, "max_batch_size": 1})
    with ServerThread(create_app(served, limits, api_key=KEY)) as url:
        barrier = threading.Barrier(8)
        results = []

        def one(i):
            barrier.wait()
            results.append(request(url, body=ask_body(max_tokens=60 + i)))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(s for s, _, _ in results)
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
        for status, headers, payload in results:
            if status == 429:
                assert int(headers["retry-after"]) >= 1 and payload["error"]["code"] == "queue_full"
            else:
                assert payload["choices"][0]["message"]["content"] is not None
        assert wait_idle(url)["alive"]


def test_disconnect_mid_stream_cancels_generation(server):
    before = wait_idle(server)
    parts = urlsplit(server)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.connect()
    sock = conn.sock
    conn.request("POST", "/v1/chat/completions", body=json.dumps(ask_body(max_tokens=450, stream=True)),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    while b'"content": "' not in (line := response.readline()) or b'"content": ""' in line:
        assert line, "the stream ended before any text"
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    after = wait_idle(server, seconds=10)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["stopped_mid_generation"] == before["stopped_mid_generation"] + 1
    assert after["completed"] == before["completed"]  # the cut-off job was never finished
    start = time.monotonic()
    assert request(server, body=ask_body(max_tokens=4))[0] == 200  # the worker is free again
    assert time.monotonic() - start < 10


def test_disconnect_while_waiting_cancels_too(server):
    """A non-streaming client that gives up (closes the socket) cancels its generation as well."""
    before = wait_idle(server)
    parts = urlsplit(server)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        body = json.dumps(ask_body(max_tokens=450)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while not health(server)["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    after = wait_idle(server, seconds=10)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


# --- no traceback ever reaches a client --------------------------------------------------------------------

class Exploding:
    """An answerer that fails inside generation, with a secret in its error."""

    def __init__(self, tokenizer):
        from faqtune.config import GenerationConfig

        self.tokenizer, self.gen, self.system_prompt, self.stop_ids = tokenizer, GenerationConfig(), None, [0]

    def answer_batch(self, conversations, gen=None, stopping=None):
        raise RuntimeError("secret internals at /srv/model")


class BrokenTokenizer:
    chat_template = "x"

    def apply_chat_template(self, *args, **kwargs):
        raise RuntimeError("secret internals in the handler")


def test_internal_errors_are_generic_and_logged(tiny_tokenizer, caplog):
    from faqtune.serve.app import create_app
    from faqtune.serve.engine import ServedModel, ServedModels
    from faqtune.serve.http import ServerThread

    caplog.set_level(logging.INFO, logger="faqtune.serve")
    entries = {"boom": ServedModel("boom", Exploding(tiny_tokenizer), "a", tiny_tokenizer, 512),
               "crash": ServedModel("crash", Exploding(tiny_tokenizer), "a", BrokenTokenizer(), 512)}
    with ServerThread(create_app(ServedModels(entries), api_key=None)) as url:
        for model in ("boom", "crash"):
            status, _, payload = request(url, body=ask_body(model=model), key=None)
            assert status == 500 and payload["error"]["code"] == "internal_error", payload
            assert "secret" not in json.dumps(payload) and "Traceback" not in json.dumps(payload)
        status, _, text = request(url, body=ask_body(model="boom", stream=True), key=None)
        assert status == 200 and '"internal_error"' in text and text.rstrip().endswith("data: [DONE]")
        assert "secret" not in text
        assert health(url)["alive"]  # the worker survived its failed batches
    assert "secret internals at /srv/model" in caplog.text and "secret internals in the handler" in caplog.text
    assert re.search(r"POST /v1/chat/completions 500 \d+\.\d{3}s model=crash", caplog.text)


def test_request_log_lines(server, caplog):
    caplog.set_level(logging.INFO, logger="faqtune.serve")
    request(server, body=ask_body(max_tokens=2))
    request(server, body=ask_body(model="nope"))
    request(server, "GET", "/healthz")  # the line is written once the response is out: wait for the next one
    deadline = time.monotonic() + 5
    while "GET /healthz" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert re.search(r"POST /v1/chat/completions 200 \d+\.\d{3}s model=alpha", caplog.text)
    assert re.search(r"POST /v1/chat/completions 404 \d+\.\d{3}s model=nope", caplog.text)
    assert re.search(r"GET /healthz 200 \d+\.\d{3}s model=-", caplog.text)


# --- loading and the command line --------------------------------------------------------------------------

def test_runs_on_different_bases_are_refused(runs, tiny_base_no_template, tmp_path):
    from faqtune.errors import ModelError
    from faqtune.serve.engine import load_served_models
    from faqtune.serve.jobs import parse_run_specs

    other = tmp_path / "other"
    shutil.copytree(runs[0], other, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    config = other / "config.yaml"
    config.write_text(re.sub(r"(?m)^base_model: .*$", f"base_model: {tiny_base_no_template}", config.read_text()))
    with pytest.raises(ModelError, match="must share the same base model"):
        load_served_models([str(runs[0]), str(other)])
    with pytest.raises(ModelError, match="no such run directory"):
        load_served_models([str(runs[0]), str(tmp_path / "missing")])
    assert parse_run_specs([str(runs[0]), f"b={runs[1]}"]) == [("alpha", runs[0]), ("b", runs[1])]
    with pytest.raises(ModelError, match="two runs are named 'alpha'"):
        parse_run_specs([str(runs[0]), f"alpha={runs[1]}"])


def test_cli(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--host", "--port", "--api-key", "--queue-size", "--max-tokens-cap",
                                        "--max-prompt-tokens", "--allowed-host", "--header-timeout",
                                        "--trust-remote-code"))
    with socket.socket() as probe:  # a port free a moment ago
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert main(["serve", str(tmp_path / "nope"), "--port", str(free)]) == 2
    err = capsys.readouterr().err
    assert "no such run directory" in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536"])
def test_cli_refuses_ports_out_of_range(capsys, tmp_path, port):
    """Issue 15: `--port 99999` listened on another port (99999 mod 65536) without a word."""
    assert main(["serve", str(tmp_path / "nope"), "--port", port]) == 2
    err = capsys.readouterr().err
    assert err == f"error: `--port` must be between 1 and 65535, got {port}\n"


def test_streamable_holds_back_partial_markers():
    from faqtune.serve.jobs import streamable

    markers = ("<|im_end|>", "STOP")
    assert streamable("  Hello there <|im_", markers) == "Hello there"
    assert streamable("Hello<|im_end|> more", markers) == "Hello"
    assert streamable("Hello ST", markers) == "Hello"
    assert streamable("caf\ufffd", markers) == "caf"


# --- the chat page -----------------------------------------------------------------------------------------

def test_chat_page_is_self_contained(server):
    status, headers, page = request(server, "GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in page
    for path in ("/static/chat.js", "/static/chat.css"):
        status, _, text = request(server, "GET", path, key=None)
        assert status == 200 and "http://" not in text and "https://" not in text  # no CDN
    assert "http://" not in page and "https://" not in page


def _chrome():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP violations included
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_chat_page_in_a_browser(server, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = client.chat.completions.create(model="second", messages=[{"role": "user", "content": QUESTION}])
    browser = _chrome()
    try:
        browser.get(server + "/")
        wait = WebDriverWait(browser, 20)
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.ID, "question").click()  # leaving the key field lists the models with it
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) == 3)
        browser.find_element(By.CSS_SELECTOR, "#model option[value='second']").click()
        browser.find_element(By.ID, "question").send_keys(QUESTION)
        browser.find_element(By.ID, "send").click()
        bubble = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-state='done'], .msg.error"))
        assert "error" not in bubble.get_attribute("class"), bubble.text
        content = expected.choices[0].message.content
        citation = (expected.choices[0].model_extra or {}).get("faqtune_citation")
        assert citation is not None  # the served runs are grounded: the page shows where the answer came from
        note = bubble.find_element(By.CSS_SELECTOR, ".citation").text
        assert note == f"source: FAQ #{citation['id']}: {citation['question']}"
        related = (expected.choices[0].model_extra or {}).get("faqtune_related") or []
        offered = [e.text for e in bubble.find_elements(By.CSS_SELECTOR, ".related button")]
        assert offered == [r["question"] for r in related]  # offered as buttons that ask them
        rest = bubble.text.replace(note, "")
        for shown in bubble.find_elements(By.CSS_SELECTOR, ".related"):
            rest = rest.replace(shown.text, "")
        assert rest.strip() == content.strip()
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == QUESTION
        refused = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not refused  # the page runs under its CSP (no inline script or style)
    finally:
        browser.quit()


def test_grounded_answers_offer_the_related_entries_the_index_finds(client, runs):
    from faqtune.grounding import open_run_index, related_hits

    vague = "how do i do a thing"  # entries 1, 4 and 2 within 0.03 of each other
    index = open_run_index(runs[1])
    near = related_hits(index.search(vague, k=3), index.threshold)
    messages = [{"role": "user", "content": vague}]
    extra = client.chat.completions.create(model="second", messages=messages).choices[0].model_extra
    expected = [h.id for h in near if h.id != extra["faqtune_citation"]["id"]][:2]
    assert len(expected) == 2
    assert [r["id"] for r in extra["faqtune_related"]] == expected
    chunks = list(client.chat.completions.create(model="second", messages=messages, stream=True))
    streamed = [c.choices[0].model_extra.get("faqtune_related") for c in chunks if c.choices]
    assert [r["id"] for r in streamed[-1]] == expected and not any(streamed[:-1])


def test_grounded_runs_cite_their_entry_and_decline_offtopic_without_generating(client):
    answer = client.chat.completions.create(model="second", messages=[{"role": "user", "content": QUESTION}])
    citation = answer.choices[0].model_extra["faqtune_citation"]
    assert isinstance(citation["id"], int) and citation["question"] and 0 < citation["score"] <= 1
    off = [{"role": "user", "content": "Who painted the Mona Lisa?"}]
    declined = client.chat.completions.create(model="second", messages=off)
    assert declined.choices[0].message.content.startswith("I'm sorry")
    assert not declined.choices[0].model_extra.get("faqtune_citation")
    assert declined.usage.completion_tokens == 0
    chunks = list(client.chat.completions.create(model="second", messages=off, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        declined.choices[0].message.content


def test_a_rebuilt_index_is_picked_up_without_a_restart(runs, tmp_path, caplog):
    """Issue 15: `faqtune index FAQ --out RUN/index` (swapped into place) is used by a running server: an
    off-topic question it declined without generating is answered once its entry is added. An index that
    fails to load is reported once and the previous one kept."""
    from faqtune.serve.app import create_app
    from faqtune.serve.engine import load_served_models
    from faqtune.serve.http import ServerThread

    caplog.set_level(logging.INFO, logger="faqtune.serve")
    run = tmp_path / "live"
    shutil.copytree(runs[0], run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    question = "Who painted the Mona Lisa?"
    rows = [{"question": f"How do I do thing number {i}?", "answer": f"Thing {i} is done on page {i}."}
            for i in range(8)] + [{"question": question, "answer": "Leonardo da Vinci painted the Mona Lisa."}]
    faq = tmp_path / "faq.json"
    faq.write_text(json.dumps({"questions": rows}))
    body = ask_body(model="live", messages=[{"role": "user", "content": question}])

    def declined() -> bool:
        status, _, payload = request(url, body=body, key=None)
        assert status == 200, payload
        choice = payload["choices"][0]
        return payload["usage"]["completion_tokens"] == 0 and not choice.get("faqtune_citation")

    served = load_served_models([str(run)])
    with ServerThread(create_app(served, api_key=None)) as url:
        assert declined()
        assert main(["index", str(faq), "--out", str(run / "index")]) == 0
        deadline = time.monotonic() + 15
        while declined():
            assert time.monotonic() < deadline, "the rebuilt index was not picked up"
            time.sleep(0.3)
        assert health(url)["index_reloads"] == 1
        assert served.entries["live"].answerer.index.search(question, k=1)[0].question == question
        (run / "index" / "index.json").write_text(json.dumps({"embedder": "all-MiniLM-L6-v2"}))  # no threshold
        for _ in range(4):
            assert not declined()  # still the loaded index
            time.sleep(0.4)
        assert health(url)["index_reloads"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "does not load" in
                r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
