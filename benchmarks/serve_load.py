# .venv/bin/python benchmarks/serve_load.py runs/demo --clients 32 --requests 128
"""Load test of `faqtune serve`: concurrent clients asking the bundled FAQ's questions.

Phase 1 ("under the bound"): the queue holds every client, so each request must succeed (errors must be 0);
reports throughput, p50/p99 latency and generated tokens/s. Phase 2 ("over the bound"): the same clients
against a small queue; the overflow must be answered 429 (with Retry-After), never an error or a hang.
Phase 3 ("stream_check", one client): each question streamed and not; the texts must be equal (mismatches 0),
and the time to the first streamed text is reported.
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


def main(argv: list[str] | None = None) -> int:
    default_run = ROOT / "runs" / "demo"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", default=str(default_run) if default_run.exists() else None,
                   help="a trained run [default: runs/demo if present]")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="requests per phase")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--small-queue", type=int, default=4, help="queue size of phase 2")
    p.add_argument("--questions", metavar="FAQ", help="an FAQ file whose questions the clients ask (any format "
                                                     "faqtune reads, e.g. RUN_DIR/data/train.jsonl) [default: the bundled FAQ]")
    p.add_argument("--out", help="JSON path [default: benchmarks/results/DATE-serve-load.json]")
    args = p.parse_args(argv)
    if args.run_dir is None:
        p.error("no run directory given and runs/demo does not exist (make demo, or pass a run)")

    from common import commit, machine, machine_line, write_result

    from faqtune.cli import _quiet
    from faqtune.data import bundled_faq_path, load_faq
    from faqtune.serve import ServeLimits, ServerThread, create_app
    from faqtune.serve_engine import load_served_models

    _quiet()
    questions = [e.question for e in load_faq(args.questions or bundled_faq_path()).entries]
    start = time.perf_counter()
    models = load_served_models([args.run_dir])
    load_s = time.perf_counter() - start
    model = models.names[0]
    phases = {}
    plan = [("single_client", 64, 1, min(8, args.requests)),  # the baseline batching is measured against
            ("under_bound", max(64, args.clients), args.clients, args.requests),
            ("over_bound", args.small_queue, args.clients, args.requests)]
    for phase, queue, clients, requests in plan:
        limits = ServeLimits(queue_size=queue, max_batch_size=args.max_batch_size)
        with ServerThread(create_app(models, limits)) as url:
            post(url, {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})  # warm-up
            print(f"{phase}: {clients} clients, {requests} requests, queue {queue} ...", file=sys.stderr)
            phases[phase] = {"queue_size": queue, "clients": clients,
                             **run_phase(url, model, questions, clients, requests, args.max_tokens)}
    with ServerThread(create_app(models, ServeLimits(max_batch_size=args.max_batch_size))) as url:
        print(f"stream_check: 1 client, {min(8, args.requests)} questions streamed and not ...", file=sys.stderr)
        stream = stream_phase(url, model, questions, min(8, args.requests), args.max_tokens)

    import torch

    report = {
        "date": date.today().isoformat(), "run_dir": str(args.run_dir), "model": model,
        "base_model": str(models.entries[models.names[-1]].name),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "clients": args.clients, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
        "model_load_s": round(load_s, 1), "phases": phases, "stream_check": stream,
    }
    cols = ["clients", "queue_size", "requests", "ok", "errors", "rejected_429", "throughput_rps", "completion_tokens_per_s",
            "latency_p50_s", "latency_p99_s"]
    print(f"\n{'phase':14s} " + " ".join(f"{c:>14s}" for c in cols))
    for name, figures in phases.items():
        print(f"{name:14s} " + " ".join(f"{figures[c]!s:>14s}" for c in cols))
    print(f"\nstream_check: {stream}\n{machine_line()}")
    if args.out:
        report.update(commit=commit(), machine=machine())
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.out}")
    else:
        write_result(report, "-serve-load")
    bad = phases["under_bound"]["errors"] + phases["under_bound"]["rejected_429"] + phases["over_bound"]["errors"]
    bad += stream["mismatches"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
