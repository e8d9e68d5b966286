"""The FAQ index at scale: build time, query latency and memory for N synthetic entries (default 100,000).

    python benchmarks/index_scale.py               # 100,000 entries
    python benchmarks/index_scale.py --n 10000     # quicker

Entries are synthetic (templated questions about products, orders and policies with distinct numbers);
queries are 200 rephrasings of random entries. Memory is the process's peak RSS growth during the build and
during the queries (ru_maxrss). Writes benchmarks/results/<date>-index-scale-<n>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from common import write_result

from faqtune.data import FaqEntry
from faqtune.retrieval import FaqIndex, load_embedder

TOPICS = ["return", "exchange", "ship", "track", "cancel", "repair", "warranty", "gift wrap", "price match", "recycle"]
THINGS = ["jacket", "tent", "boot", "backpack", "stove", "lamp", "kayak", "helmet", "glove", "bottle"]


def synthetic(n: int) -> list[FaqEntry]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        topic, thing = TOPICS[i % len(TOPICS)], THINGS[(i // len(TOPICS)) % len(THINGS)]
        model = f"{thing.upper()[:3]}-{i:06d}"
        q = f"How do I {topic} the {thing} model {model}?"
        a = (f"To {topic} a {model} {thing}, open Orders, pick the item and choose '{topic}'. "
             f"It takes {rng.randint(1, 14)} days; fee {rng.randint(0, 30)} dollars.")
        out.append(FaqEntry((("user", q), ("assistant", a))))
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args()
    entries = synthetic(args.n)
    load_embedder("all-MiniLM-L6-v2")  # load the model before measuring
    rss0 = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        index = FaqIndex.build(entries, tmp)
        build_s = time.perf_counter() - t
        rss_build = rss_mib()
        rng = random.Random(1)
        picks = [rng.randrange(args.n) for _ in range(args.queries)]
        queries = [entries[i].question.lower().replace("how do i", "can i").rstrip("?") for i in picks]
        index.search(queries[0])
        lat = []
        hits = []
        for q in queries:
            t = time.perf_counter()
            hits.append(index.search(q, k=3))
            lat.append(time.perf_counter() - t)
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    lat.sort()
    result = {
        "date": str(datetime.date.today()), "entries": args.n, "build_seconds": build_s,
        "entries_per_second": args.n / build_s, "query_p50_ms": 1000 * statistics.median(lat),
        "query_p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "top1_hit_rate": sum(h[0].id == i for h, i in zip(hits, picks, strict=True)) / len(picks),
        "rss_growth_build_mib": rss_build - rss0, "rss_growth_total_mib": rss_mib() - rss0,
        "index_disk_mib": disk / 2**20,
    }
    print(json.dumps(result, indent=2))
    write_result(result, f"-index-scale-{args.n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
