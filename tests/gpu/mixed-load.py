#!/usr/bin/env python3
"""Mixed load against a running dspark server, standard library only (the GPU machines reach no
package index): every client loops over greedy completions of long prompts that share a
~2,100-token prefix (prefill chunks, prefix-cache hits), streams abandoned after 5 chunks and
malformed bodies (which must get 400). Run the server with a pool small enough to preempt. At
the end a few completions are replayed alone: with weights whose logits have clear margins
(the tiny model) and f32 GEMMs (DSPARK_GEMM_TF32=0), a greedy output must not depend on the batch
it ran in. Exit 1 on a transport error, an unexpected status or a replay mismatch (--strict).

  python3 tests/gpu/mixed-load.py --base-url http://127.0.0.1:8000 --model tiny-dsv4 \\
      --minutes 2 --clients 16 --replays 20 --strict
"""
import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

SYSTEM = "You are a careful assistant. " * 300


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--replays", type=int, default=6)
    ap.add_argument("--strict", action="store_true", help="a replay mismatch fails the run")
    a = ap.parse_args()

    def post(body):
        req = urllib.request.Request(a.base_url + "/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        return urllib.request.urlopen(req, timeout=600)

    stats, lock, done, errors = Counter(), threading.Lock(), [], []

    def client(seed):
        rng = random.Random(seed)
        end = time.time() + a.minutes * 60
        while time.time() < end:
            kind = rng.choice(["greedy", "greedy", "greedy", "stream_abandon", "bad"])
            tail = " ".join(f"item{rng.randrange(100000)}" for _ in range(rng.randrange(50, 2500)))
            body = {"model": a.model, "prompt": SYSTEM + tail, "max_tokens": rng.randrange(16, 384),
                    "temperature": 0, "ignore_eos": True}
            try:
                if kind == "bad":
                    try:
                        post({"model": a.model, "prompt": 12, "max_tokens": -3})
                        key = "bad:200"
                    except urllib.error.HTTPError as e:
                        key = f"bad:{e.code}"
                elif kind == "stream_abandon":
                    with post({**body, "stream": True}) as r:
                        chunks = 0
                        for line in r:
                            chunks += line.startswith(b"data:")
                            if chunks >= 5:
                                break
                    key = "stream_abandon:200"
                else:
                    t0 = time.time()
                    with post(body) as r:
                        out = json.load(r)
                    key = "greedy:200"
                    with lock:
                        done.append((body, out["choices"][0]["text"], out["usage"], time.time() - t0))
            except urllib.error.HTTPError as e:
                key = f"{kind}:{e.code}"
            except Exception as e:  # a transport error is a failure
                key = f"{kind}:error"
                errors.append(repr(e)[:200])
            with lock:
                stats[key] += 1

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(r[3] for r in done) or [0.0]
    print(f"LOAD wall_s={time.time() - t0:.0f} by_kind={dict(stats)} completions={len(done)} "
          f"prompt_tokens={sum(r[2]['prompt_tokens'] for r in done)} "
          f"generated={sum(r[2]['completion_tokens'] for r in done)} p50_s={lat[len(lat) // 2]:.2f} "
          f"p99_s={lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.2f} transport_errors={len(errors)}")
    for e in errors[:5]:
        print("  error:", e)
    same = 0
    picks = random.Random(7).sample(done, min(a.replays, len(done)))
    for body, text, _, _ in picks:
        with post(body) as r:
            same += json.load(r)["choices"][0]["text"] == text
    print(f"REPLAY alone_equal={same}/{len(picks)}")
    bad = errors or any(not k.endswith((":200", ":400")) or k == "bad:200" for k in stats)
    return 1 if bad or (a.strict and same != len(picks)) else 0


if __name__ == "__main__":
    sys.exit(main())
