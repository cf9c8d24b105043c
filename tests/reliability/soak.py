"""Soak mode (minutes, not in CI): steady mixed traffic against one server, reporting over time.

    python tests/reliability/soak.py --minutes 10 --clients 8
    python tests/reliability/soak.py --base-url http://127.0.0.1:8000 --pid 1234 --minutes 30

Without --base-url it starts the tiny-model server itself (as the tests do). Each client loops:
a greedy completion, a streamed chat, a stream it abandons after a few chunks, and a malformed
request. Every --interval seconds it prints one line: requests, errors by class, p50/p99 latency
of successful requests, the server's RSS and the KV pool use. At the end: a summary line, and a
non-zero exit if any 5xx or transport error was seen or the server stopped answering /health.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reliability_support import MODEL, Server, metric, rss_bytes  # noqa: E402


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.classes: Counter[str] = Counter()
        self.latencies: list[float] = []

    def add(self, cls: str, latency: float | None = None) -> None:
        with self.lock:
            self.requests += 1
            self.classes[cls] += 1
            if latency is not None:
                self.latencies.append(latency)

    def snapshot(self):
        with self.lock:
            lat = sorted(self.latencies)
            return self.requests, dict(self.classes), lat


def classify(status: int) -> str:
    return "ok" if status < 300 else f"{status // 100}xx"


def client_loop(base: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as http:
        while not stop.is_set():
            kind = rng.choice(["completion", "chat_stream", "abandon", "malformed"])
            t0 = time.monotonic()
            try:
                if kind == "completion":
                    r = http.post("/v1/completions", json={"model": MODEL, "prompt": f"soak {rng.random()}",
                                                          "max_tokens": rng.randint(1, 64), "temperature": 0})
                    tally.add(classify(r.status_code), time.monotonic() - t0 if r.status_code == 200 else None)
                elif kind in ("chat_stream", "abandon"):
                    body = {"model": MODEL, "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
                            "max_tokens": rng.randint(8, 96), "stream": True, "temperature": 0.7, "ignore_eos": True}
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        for i, _ in enumerate(r.iter_lines()):
                            if kind == "abandon" and i == 4:
                                break
                    tally.add(classify(r.status_code) if kind == "chat_stream" else "abandoned",
                              time.monotonic() - t0 if kind == "chat_stream" and r.status_code == 200 else None)
                else:
                    r = http.post("/v1/chat/completions", content=b'{"model": "' + MODEL.encode() + b'", "messages": [',
                                  headers={"content-type": "application/json"})
                    tally.add("expected_4xx" if r.status_code == 400 else classify(r.status_code))
            except httpx.HTTPError as e:
                tally.add(f"transport:{type(e).__name__}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url")
    ap.add_argument("--pid", type=int, help="server pid for RSS (with --base-url)")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--interval", type=float, default=30)
    args = ap.parse_args()

    server = None
    if args.base_url:
        base, pid = args.base_url.rstrip("/"), args.pid
    else:
        server = Server(["--max-model-len", "1024", "--kv-pool-tokens", "4096", "--max-num-seqs", "16"])
        base, pid = server.base, server.proc.pid

    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(base, tally, stop, i), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    t_start, max_rss, healthy = time.monotonic(), 0, True
    deadline = t_start + args.minutes * 60
    try:
        while time.monotonic() < deadline:
            time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))
            n, classes, lat = tally.snapshot()
            rss = rss_bytes(pid) if pid else 0
            max_rss = max(max_rss, rss)
            p50 = statistics.median(lat) if lat else 0.0
            p99 = lat[int(0.99 * (len(lat) - 1))] if lat else 0.0
            usage = metric(base, "vllm:kv_cache_usage_perc")
            print(f"SOAK t={time.monotonic() - t_start:.0f}s requests={n} classes={classes} "
                  f"p50_s={p50:.3f} p99_s={p99:.3f} rss_mib={rss / 2**20:.1f} kv_usage={usage:.3f}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(130)
        try:
            healthy = httpx.get(base + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if server is not None:
            code = server.stop()
            healthy = healthy and code == 0
    n, classes, lat = tally.snapshot()
    bad = {k: v for k, v in classes.items() if k.startswith(("5", "transport"))}
    print(f"SOAK summary: requests={n} classes={classes} max_rss_mib={max_rss / 2**20:.1f} "
          f"healthy={healthy} bad={bad}", flush=True)
    return 0 if healthy and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
