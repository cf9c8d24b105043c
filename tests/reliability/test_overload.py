"""Overload and KV-pool pressure against the real server.

- Far more concurrent clients than `--max-num-seqs` + `--max-waiting-requests`: the excess gets a
  quick 429 in OpenAI's error shape, every admitted request finishes, and its greedy tokens equal
  the same request run alone. Nothing is lost: every client gets exactly one of the two answers.
- A pool too small for the concurrent requests (`--kv-pool-tokens`): the scheduler preempts and
  recomputes, `vllm:num_preemptions_total` rises, and every request's greedy tokens (including a
  long victim request while short ones churn around it) equal its tokens alone.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from reliability_support import MODEL, assert_error_shape, metric, record_summary, start, wait_for

OVERLOAD_SEQS = 2
OVERLOAD_WAITING = 2
OVERLOAD_CLIENTS = 40
# A 429 is decided at admission: it must not wait for running requests.
QUICK_429_S = 2.0


@pytest.fixture(scope="module")
def small_queue_server():
    yield from start([
        "--max-model-len", "512", "--kv-pool-tokens", "4096",
        "--max-num-seqs", str(OVERLOAD_SEQS), "--max-waiting-requests", str(OVERLOAD_WAITING),
    ])


# 4 blocks of 128 tokens: fewer than the concurrent requests below need once they grow.
PRESSURE_POOL = 512
PRESSURE_MAX_LEN = 384


@pytest.fixture(scope="module")
def small_pool_server():
    yield from start([
        "--max-model-len", str(PRESSURE_MAX_LEN), "--kv-pool-tokens", str(PRESSURE_POOL),
        "--max-num-seqs", "8",
    ])


def greedy_request(prompt: str, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True}


def token_ids(resp_json: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in resp_json["choices"][0]["logprobs"]["tokens"]]


def run_alone(http: httpx.Client, prompt: str, max_tokens: int) -> list[int]:
    r = http.post("/v1/completions", json=greedy_request(prompt, max_tokens))
    assert r.status_code == 200, r.text
    return token_ids(r.json())


def test_overload_excess_gets_quick_429_admitted_are_exact(small_queue_server):
    base = small_queue_server.base
    max_tokens = 160
    prompts = [f"Overload client number {i} asks:" for i in range(OVERLOAD_CLIENTS)]
    barrier = threading.Barrier(OVERLOAD_CLIENTS)
    outcomes: list[tuple[int, float, dict | str]] = [None] * OVERLOAD_CLIENTS  # type: ignore[list-item]

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as http:
            barrier.wait()
            t0 = time.monotonic()
            try:
                r = http.post("/v1/completions", json=greedy_request(prompts[i], max_tokens))
            except httpx.HTTPError as e:
                outcomes[i] = (-1, time.monotonic() - t0, repr(e))
                return
            elapsed = time.monotonic() - t0
            try:
                body = r.json()
            except ValueError:
                body = r.text
            outcomes[i] = (r.status_code, elapsed, body)

    with ThreadPoolExecutor(OVERLOAD_CLIENTS) as pool:
        list(pool.map(client, range(OVERLOAD_CLIENTS)))

    statuses = Counter(o[0] for o in outcomes)
    admitted = [i for i, o in enumerate(outcomes) if o[0] == 200]
    rejected = [i for i, o in enumerate(outcomes) if o[0] == 429]
    slowest_429 = max((outcomes[i][1] for i in rejected), default=0.0)
    with httpx.Client(base_url=base, timeout=300) as http:
        mismatched = [i for i in admitted if token_ids(outcomes[i][2]) != run_alone(http, prompts[i], max_tokens)]
    record_summary("overload", requests=OVERLOAD_CLIENTS, capacity=OVERLOAD_SEQS + OVERLOAD_WAITING,
                   by_status=dict(sorted(statuses.items())), slowest_429_s=round(slowest_429, 3),
                   admitted_mismatched=len(mismatched))

    # Nothing lost: every client got a full answer or a 429, nothing else.
    assert set(statuses) <= {200, 429}, [o for o in outcomes if o[0] not in (200, 429)][:3]
    assert len(admitted) + len(rejected) == OVERLOAD_CLIENTS
    # The queue bound counts requests the scheduler has not admitted yet, including ones a free
    # slot will take at its next step, so a burst is only guaranteed the queue's worth
    # (docs/RELIABILITY.md, "Known behaviour"); runs here admit all 4, but CI timing may not.
    assert len(admitted) >= OVERLOAD_WAITING
    assert len(rejected) >= 1, "the excess was never refused"
    for i in rejected:
        err = outcomes[i][2]
        assert isinstance(err, dict) and err.get("error", {}).get("type") == "rate_limit_error", err
        assert err["error"]["message"] and "code" in err["error"] and "param" in err["error"]
    assert slowest_429 < QUICK_429_S, f"a 429 took {slowest_429:.2f}s"
    for i in admitted:
        body = outcomes[i][2]
        assert body["usage"]["completion_tokens"] == max_tokens
        assert body["choices"][0]["finish_reason"] == "length"
    assert not mismatched, f"admitted requests {mismatched} differ from the same request alone"
    assert wait_for(lambda: metric(base, "vllm:num_requests_running") == 0
                    and metric(base, "vllm:num_requests_waiting") == 0
                    and metric(base, "dspark_kv_live_tokens") == 0, 10)


def test_429_has_openai_shape_and_retry_after(small_queue_server):
    """A full queue: both endpoints answer 429 with the error shape and a Retry-After header."""
    base = small_queue_server.base
    # Fill the running slots and the queue from raw sockets: a client waits for response headers,
    # which a queued request does not get until it runs, so sequential clients could not fill it.
    fillers = []
    try:
        for i in range(OVERLOAD_SEQS + OVERLOAD_WAITING):
            body = json.dumps(greedy_request(f"fill {i}", 500) | {"stream": True}).encode()
            s = socket.create_connection(("127.0.0.1", small_queue_server.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            fillers.append(s)
            # One at a time: a burst is bounded by requests not yet admitted, which momentarily
            # includes those about to take a free slot (scheduler/handle.rs `queued`).
            assert wait_for(lambda: metric(base, "vllm:num_requests_running")
                            + metric(base, "vllm:num_requests_waiting") == i + 1, 10)
        assert wait_for(lambda: metric(base, "vllm:num_requests_waiting") == OVERLOAD_WAITING
                        and metric(base, "vllm:num_requests_running") == OVERLOAD_SEQS, 20)
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/v1/completions", json=greedy_request("one too many", 4))
            assert r.status_code == 429, r.text
            assert_error_shape(r)
            assert r.headers.get("retry-after", "").isdigit()
            r = http.post("/v1/chat/completions",
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 429, r.text
            assert_error_shape(r)
    finally:
        for s in fillers:
            s.close()
    assert wait_for(lambda: metric(base, "dspark_kv_live_tokens") == 0, 10)


def test_pool_pressure_preempts_and_outputs_stay_exact(small_pool_server):
    base = small_pool_server.base
    http = httpx.Client(base_url=base, timeout=600)
    # The victim: a long request that needs 3 of the pool's 4 blocks by its end.
    victim_prompt, victim_tokens = "The victim request is long and patient:", 300
    churn = [(f"Short churn request {i}:", 90 + 7 * (i % 5)) for i in range(16)]
    victim_alone = run_alone(http, victim_prompt, victim_tokens)
    churn_alone = [run_alone(http, p, n) for p, n in churn]
    preemptions_before = metric(base, "vllm:num_preemptions_total")

    results: dict[str, list[int] | str] = {}

    def one(key: str, prompt: str, n: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as c:
            r = c.post("/v1/completions", json=greedy_request(prompt, n))
            results[key] = token_ids(r.json()) if r.status_code == 200 else f"{r.status_code} {r.text[:300]}"

    victim = threading.Thread(target=one, args=("victim", victim_prompt, victim_tokens))
    # Churn: short requests arriving all the time. The first ones take the pool's other blocks;
    # the victim arrives after them, so when it needs a new block it is the newest running
    # request, the scheduler's preemption choice, and is recomputed; later arrivals are preempted
    # in turn when the victim's growth leaves no block for them.
    with ThreadPoolExecutor(6) as pool:
        futures = []
        for i, (p, n) in enumerate(churn):
            futures.append(pool.submit(one, f"churn{i}", p, n))
            if i == 2:
                time.sleep(0.05)
                victim.start()
            time.sleep(0.02)
        for f in futures:
            f.result()
    victim.join(600)
    assert not victim.is_alive(), "the victim request never finished"
    preemptions = metric(base, "vllm:num_preemptions_total") - preemptions_before
    churn_mismatched = [i for i, (_, _) in enumerate(churn) if results.get(f"churn{i}") != churn_alone[i]]
    record_summary("pool_pressure", requests=1 + len(churn), pool_tokens=PRESSURE_POOL,
                   preemptions=int(preemptions), victim_identical=results.get("victim") == victim_alone,
                   churn_mismatched=len(churn_mismatched))

    assert results["victim"] == victim_alone, f"victim differs under churn: {results['victim']}"
    assert not churn_mismatched, {i: results.get(f"churn{i}") for i in churn_mismatched}
    assert preemptions > 0, "the pool was never short: the test did not exercise preemption"
    assert wait_for(lambda: metric(base, "dspark_kv_live_tokens") == 0
                    and metric(base, "vllm:num_requests_running") == 0, 10)
