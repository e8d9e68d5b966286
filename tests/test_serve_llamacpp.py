"""A real engine behind `faqtune serve --backend`: llama.cpp's server (llama-cpp-python) on CPU, serving the merged
GGUF of a run of the embedded default, against the same run answered in-process.

llama-cpp-python lives in its own venv (`.venv-llama`, made best effort by .ci/run: it is built from source,
and an external process anyway); without it these tests skip, saying so. The two runtimes differ numerically
(in-process: the 4-bit base + adapter as trained, bf16/fp32 on torch; llama.cpp: the adapter merged into the
dequantized 4-bit weights, f32 GGUF), so greedy answers are compared as a measured agreement, not bit for bit;
retrieval, declines and citations happen in faqtune on both paths and must agree exactly.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_serve_upstream import KEY  # the key its stream() helper sends

from faqtune.cli import main

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = Path(os.environ.get("FAQTUNE_LLAMA_PYTHON", ROOT / ".venv-llama" / "bin" / "python"))
QUESTIONS = ["How do I return an item?", "Do you ship internationally?", "How can I track my order?",
             "What payment methods do you accept?", "can i cancel my order", "how long does shipping take",
             "Is there a warranty on products?", "What is the capital of Peru?", "Who won the 1998 World Cup?"]
# measured once (2026-12-01, 2 contended cores) with these questions on a 20-step run and its f16 GGUF: 9 of 9
# answers equal (2 declined by retrieval, 3 model declines answered verbatim, 4 generated); this test's 3-step
# run with an f32 GGUF was not yet seen to finish here, so the bound leaves room
AGREEMENT_AT_LEAST = 0.7


def llama_missing() -> str | None:
    if not LLAMA_PYTHON.exists():
        return f"llama-cpp-python is not installed ({LLAMA_PYTHON} missing; .ci/run builds it best effort)"
    probe = subprocess.run([str(LLAMA_PYTHON), "-c", "import llama_cpp.server"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"llama-cpp-python[server] does not import in {LLAMA_PYTHON}: {probe.stderr.strip()[-200:]}"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(llama_missing() is not None, reason=llama_missing() or "")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf: Path, alias: str, port: int, log: Path, run: Path) -> subprocess.Popen:
    """llama-cpp-python's server on loopback, waited for (its /v1/models answers)."""
    command = [str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", "False", "--n_threads", str(os.cpu_count() or 1)]
    # OpenMP's spinning barriers stall for seconds a token on busy shared cores (measured here: 12 tokens in
    # 80 s with 2 threads, 1.1 s with passive waits)
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp's server exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"llama.cpp's server did not start in 180 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def engine_and_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llamacpp")
    run = tmp / "bot"
    assert main(["train", "--output", str(run), "--train.max_steps", "3", "--train.save_steps", "3"]) == 0
    gguf = tmp / "bot.gguf"
    assert main(["export-gguf", str(run), str(gguf), "--outtype", "f32", "--no-verify"]) == 0
    port = free_port()
    process = start_llama_server(gguf, "bot", port, tmp / "llama-server.log", run)
    try:
        yield f"http://127.0.0.1:{port}/v1", run
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def answers(url: str, stream: bool = False) -> list[dict]:
    from test_serve import request
    from test_serve_upstream import stream as stream_request

    out = []
    for question in QUESTIONS:
        if stream:
            chunks = stream_request(url, question, max_tokens=48)  # as the whole answers below
            assert chunks[-1] == "[DONE]" and "error" not in chunks[-2], chunks[-2:]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
            out.append({"text": text, "source": chunks[-2]["choices"][0].get("faqtune_citation")})
            continue
        body = {"model": "bot", "max_tokens": 48, "messages": [{"role": "user", "content": question}]}
        status, _, got = request(url, body=body, key=KEY)
        assert status == 200, got
        choice = got["choices"][0]
        out.append({"text": choice["message"]["content"], "source": choice.get("faqtune_citation")})
    return out


def test_llamacpp_and_in_process_give_the_same_grounded_answers(engine_and_run, capsys):
    from faqtune.serve.app import create_app
    from faqtune.serve.engine import load_served_models
    from faqtune.serve.http import ServerThread
    from faqtune.serve.upstream import Upstream, load_upstream_models

    engine, run = engine_and_run
    with ServerThread(create_app(load_served_models([str(run)]), api_key=KEY)) as url:
        local = answers(url)
    with ServerThread(create_app(load_upstream_models([str(run)]), api_key=KEY,
                                 backend=Upstream(engine, timeout=120))) as url:
        upstream = answers(url)
        streamed = answers(url, stream=True)
    same = [a["text"] == b["text"] for a, b in zip(local, upstream, strict=True)]
    with capsys.disabled():
        print(f"\nllama.cpp vs in-process: {sum(same)}/{len(same)} greedy answers equal", file=sys.stderr)
        for a, b, s in zip(local, upstream, same, strict=True):
            if not s:
                print(f"  in-process: {a['text']!r}\n  llama.cpp:  {b['text']!r}", file=sys.stderr)
    # retrieval, declines and citations are faqtune's on both paths: an answer both runtimes generate alike is
    # cited alike (where the texts differ, one side's model may have declined and fallen back to the top entry)
    assert [a["source"] and a["source"]["id"] for a, s in zip(local, same, strict=True) if s] == \
        [b["source"] and b["source"]["id"] for b, s in zip(upstream, same, strict=True) if s]
    assert sum(same) / len(same) >= AGREEMENT_AT_LEAST, json.dumps([local, upstream], indent=1)
    assert [s["text"] for s in streamed] == [u["text"] for u in upstream]  # streamed == whole through the engine
    assert [s["source"] for s in streamed] == [u["source"] for u in upstream]

