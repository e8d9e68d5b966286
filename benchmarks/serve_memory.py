"""Server memory over many requests: RSS after a warm-up and after N more requests (default 1,000).

    python benchmarks/serve_memory.py runs/mybot            # any trained run
    python benchmarks/serve_memory.py runs/mybot --n 1000 --max-tokens 8

The server runs in this process (uvicorn in a thread, loopback); requests are a mix of plain, streaming,
off-topic (declined without generating), and streaming requests dropped after the first chunk (cancelled
mid-generation). RSS is read from /proc/self/status. Writes benchmarks/results/<date>-serve-memory.json.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import time
from urllib.parse import urlparse

from common import status_gib, write_result

from faqtune.data import bundled_faq_path, load_faq
from faqtune.serve.app import create_app
from faqtune.serve.engine import load_served_models
from faqtune.serve.http import ServeLimits, ServerThread


def rss_mib() -> float:
    return status_gib("VmRSS") * 1024


def post(url: str, body: dict, drop_after_first_chunk: bool = False) -> int:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if drop_after_first_chunk:
        resp.read(1)
        conn.close()  # the client goes away mid-stream
        return resp.status
    resp.read()
    conn.close()
    return resp.status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    questions = [e.question for e in load_faq(bundled_faq_path()).entries]
    models = load_served_models([args.run_dir])
    name = models.names[0]
    statuses: dict[int, int] = {}
    with ServerThread(create_app(models, ServeLimits())) as url:
        def one(i: int) -> None:
            kind = i % 4
            q = "Who painted the Mona Lisa?" if kind == 2 else questions[i % len(questions)]
            body = {"model": name, "messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens,
                    "stream": kind in (1, 3)}
            status = post(url, body, drop_after_first_chunk=kind == 3)
            statuses[status] = statuses.get(status, 0) + 1

        for i in range(args.warmup):
            one(i)
        before = rss_mib()
        started = time.perf_counter()
        for i in range(args.n):
            one(args.warmup + i)
        seconds = time.perf_counter() - started
        time.sleep(1)
        after = rss_mib()
    result = {"date": str(datetime.date.today()), "run_dir": args.run_dir, "requests": args.n,
              "warmup": args.warmup, "statuses": statuses, "rss_before_mib": before, "rss_after_mib": after,
              "rss_growth_mib": after - before, "seconds": seconds}
    print(json.dumps(result, indent=2))
    write_result(result, "-serve-memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
