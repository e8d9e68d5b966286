# .venv/bin/python benchmarks/serve_load.py runs/demo --clients 32 --requests 128
# .venv/bin/python benchmarks/serve_load.py RUN --concurrency 1,8,32 --requests 32 --llamacpp   # both backends
"""Load test of `faqtune serve`: concurrent clients asking the bundled FAQ's questions.

Phase 1 ("under the bound"): the queue holds every client, so each request must succeed (errors must be 0);
reports throughput, p50/p99 latency and generated tokens/s. Phase 2 ("over the bound"): the same clients
against a small queue; the overflow must be answered 429 (with Retry-After), never an error or a hang.
Phase 3 ("stream_check", one client): each question streamed and not; the texts must be equal (mismatches 0),
and the time to the first streamed text is reported.
With `--concurrency 1,8,32`, phase 1 runs once per client count ("c1", "c8", "c32"). With `--backend URL` (an
engine already serving the run by its name) or `--llamacpp` (this script exports the run's merged GGUF and
starts llama-cpp-python's server from .venv-llama, after the in-process phases, so the two never share the
cores), the same phases run through `serve --backend` too, side by side.
The model is loaded once; each phase runs its own server (worker + queue) on a free loopback port.
Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import sys
import threading
import time
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


def post(url: str, body: dict) -> tuple[int, float, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    seconds = time.perf_counter() - start
    conn.close()
    try:
        data = json.loads(payload)
    except ValueError:
        data = {}
    if response.status == 429:
        data["retry_after"] = response.getheader("Retry-After")
    return response.status, seconds, data


def post_stream(url: str, body: dict) -> tuple[int, float, float, str]:
    """(status, seconds to the first text delta, seconds in all, the streamed text) of a streamed request."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first, text = float("nan"), ""
    while line := response.readline():
        if not line.startswith(b"data: {"):
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            delta = choice.get("delta", {}).get("content") or ""
            if delta and not text:
                first = time.perf_counter() - start
            text += delta
    conn.close()
    return response.status, first, time.perf_counter() - start, text


def stream_phase(url: str, model: str, questions: list[str], requests: int, max_tokens: int) -> dict:
    """One client: each question not streamed, then streamed; the two texts must be equal."""
    mismatches, firsts, totals = 0, [], []
    for question in questions[:requests]:
        body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]}
        status, _, whole = post(url, body)
        s_status, first, total, text = post_stream(url, body)
        same = status == s_status == 200 and text == whole["choices"][0]["message"]["content"]
        mismatches += not same
        firsts += [first] if first == first else []  # a declined question streams its text in the last chunk
        totals.append(total)
    return {"requests": len(totals), "mismatches": mismatches, "time_to_first_text_p50_s":
            round(percentile(firsts, 0.5), 3), "latency_p50_s": round(percentile(totals, 0.5), 3)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_phase(url: str, model: str, questions: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads share `requests` requests; each thread sends its next one when the last returns."""
    counter = itertools.count()
    lock = threading.Lock()
    results: list[tuple[int, float, dict]] = []

    def client():
        while (i := next(counter)) < requests:
            body = {"model": model, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": questions[i % len(questions)]}]}
            got = post(url, body)
            with lock:
                results.append(got)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [(s, d) for s, _, d in results if s == 200]
    latencies = [sec for s, sec, _ in results if s == 200]
    tokens = sum(d["usage"]["completion_tokens"] for _, d in ok)
    return {
        "requests": len(results), "ok": len(ok), "rejected_429": sum(s == 429 for s, _, _ in results),
        "errors": sum(s not in (200, 429) for s, _, _ in results),
        "retry_after_s": sorted({int(d["retry_after"]) for s, _, d in results if s == 429}),
        "wall_s": round(wall, 2), "throughput_rps": round(len(ok) / wall, 3),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "mean_completion_tokens": round(tokens / max(1, len(ok)), 1),
    }


def backend_phases(models, backend, model: str, questions: list[str], args, concurrency: list[int]) -> tuple:
    """Every phase against one backend (None: in-process): (phases, stream_check)."""
    from faqtune.serve.app import create_app
    from faqtune.serve.http import ServeLimits, ServerThread

    phases = {}
    plan = [(f"c{c}", max(64, c), c, args.requests) for c in concurrency]
    if args.concurrency is None:  # the original three phases
        plan = [("single_client", 64, 1, min(8, args.requests)),
                ("under_bound", max(64, args.clients), args.clients, args.requests)]
    plan.append(("over_bound", args.small_queue, max(concurrency), args.requests))
    for phase, queue, clients, requests in plan:
        limits = ServeLimits(queue_size=queue, max_batch_size=args.max_batch_size)
        with ServerThread(create_app(models, limits, backend=backend)) as url:
            post(url, {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})  # warm-up
            print(f"{phase}: {clients} clients, {requests} requests, queue {queue} ...", file=sys.stderr)
            phases[phase] = {"queue_size": queue, "clients": clients,
                             **run_phase(url, model, questions, clients, requests, args.max_tokens)}
    with ServerThread(create_app(models, ServeLimits(max_batch_size=args.max_batch_size), backend=backend)) as url:
        print(f"stream_check: 1 client, {min(8, args.requests)} questions streamed and not ...", file=sys.stderr)
        stream = stream_phase(url, model, questions, min(8, args.requests), args.max_tokens)
    return phases, stream


def start_llamacpp(run_dir: str, name: str, python: str) -> tuple:
    """Export the run's merged GGUF (f16, as serve-config says) and start llama-cpp-python's server on it."""
    import socket
    import subprocess
    import tempfile

    from faqtune.ship.gguf import export_run

    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    gguf = folder / f"{name}.gguf"
    export_run(run_dir, gguf, "f16", verify=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (folder / "llama-server.log").open("wb")
    process = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
                                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", "False",
                                "--n_threads", str(os.cpu_count() or 1)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})  # busy shared cores
    deadline = time.perf_counter() + 180
    while time.perf_counter() < deadline and process.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"llama.cpp's server did not start; see {folder / 'llama-server.log'}")


def print_table(name: str, phases: dict, stream: dict) -> None:
    cols = ["clients", "queue_size", "requests", "ok", "errors", "rejected_429", "throughput_rps",
            "completion_tokens_per_s", "latency_p50_s", "latency_p99_s"]
    print(f"\n[{name}]\n{'phase':14s} " + " ".join(f"{c:>14s}" for c in cols))
    for phase, figures in phases.items():
        print(f"{phase:14s} " + " ".join(f"{figures[c]!s:>14s}" for c in cols))
    print(f"stream_check: {stream}")


def main(argv: list[str] | None = None) -> int:
    default_run = ROOT / "runs" / "demo"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", default=str(default_run) if default_run.exists() else None,
                   help="a trained run [default: runs/demo if present]")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--concurrency", help="client counts of phase 1, e.g. 1,8,32 [default: 1 and --clients]")
    p.add_argument("--requests", type=int, default=128, help="requests per phase")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--small-queue", type=int, default=4, help="queue size of phase 2")
    p.add_argument("--backend", metavar="URL", help="also measure `serve --backend URL` (an engine serving the run "
                                                    "under its folder's name)")
    p.add_argument("--llamacpp", action="store_true", help="also measure llama.cpp's server (llama-cpp-python from "
                                                           "--llama-python), started here on the run's GGUF")
    p.add_argument("--skip-in-process", action="store_true", help="measure only the engine behind faqtune")
    p.add_argument("--llama-python", default=str(ROOT / ".venv-llama" / "bin" / "python"))
    p.add_argument("--questions", metavar="FAQ", help="an FAQ file whose questions the clients ask (any format "
                                                     "faqtune reads, e.g. RUN_DIR/data/train.jsonl) [default: the bundled FAQ]")
    p.add_argument("--out", help="JSON path [default: benchmarks/results/DATE-serve-load.json]")
    args = p.parse_args(argv)
    if args.run_dir is None:
        p.error("no run directory given and runs/demo does not exist (make demo, or pass a run)")
    concurrency = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [1, args.clients]

    from common import commit, machine, machine_line, write_result

    from faqtune.cli import _quiet
    from faqtune.data import bundled_faq_path, load_faq
    from faqtune.serve.engine import load_served_models
    from faqtune.serve.upstream import Upstream, load_upstream_models

    _quiet()
    questions = [e.question for e in load_faq(args.questions or bundled_faq_path()).entries]
    start = time.perf_counter()
    models = load_served_models([args.run_dir])
    load_s = time.perf_counter() - start
    model = models.names[0]
    phases, stream = {}, {}
    if not args.skip_in_process:
        phases, stream = backend_phases(models, None, model, questions, args, concurrency)
        print_table("in-process", phases, stream)
    backends = {}
    if args.backend or args.llamacpp:
        del models  # the in-process model is not needed any more
        process, url = (None, args.backend) if args.backend else start_llamacpp(args.run_dir, model, args.llama_python)
        try:
            upstream = load_upstream_models([args.run_dir])
            name = "llamacpp" if args.llamacpp else "upstream"
            up_phases, up_stream = backend_phases(upstream, Upstream(url), model, questions, args, concurrency)
            backends[name] = {"url": url, "phases": up_phases, "stream_check": up_stream}
            print_table(name, up_phases, up_stream)
        finally:
            if process is not None:
                process.terminate()
                process.wait(20)

    import torch

    report = {
        "date": date.today().isoformat(), "run_dir": str(args.run_dir), "model": model,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "clients": args.clients, "concurrency": concurrency, "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size, "model_load_s": round(load_s, 1), "phases": phases,
        "stream_check": stream, "backends": backends,
    }
    print(f"\n{machine_line()}")
    if args.out:
        report.update(commit=commit(), machine=machine())
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.out}")
    else:
        write_result(report, "-serve-load" + ("-backends" if backends else ""))
    bad = 0
    measured = [(phases, stream)] if phases else []
    for figures, check in measured + [(b["phases"], b["stream_check"]) for b in backends.values()]:
        bad += sum(f["errors"] + f["rejected_429"] for k, f in figures.items() if k != "over_bound")
        bad += figures["over_bound"]["errors"] + check["mismatches"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
