"""Faults: clients that vanish, a rank that dies, a SIGTERM with requests in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from reliability_support import (
    MODEL, Server, children, cmdline, metric, record_summary, rss_bytes, wait_for,
)

# The client must learn of a dead rank within this, and the server must be gone within this.
FAIL_FAST_S = 15.0


def stream_request(prompt: str, max_tokens: int, chat: bool = False) -> tuple[str, dict]:
    common = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    if chat:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", common | {"prompt": prompt}


def sse_events(resp: httpx.Response):
    """Parsed `data:` payloads of an SSE response ("[DONE]" as the string)."""
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def kv_idle(base: str) -> bool:
    return (metric(base, "vllm:num_requests_running") == 0 and metric(base, "vllm:num_requests_waiting") == 0
            and metric(base, "dspark_kv_live_tokens") == 0 and metric(base, "vllm:kv_cache_usage_perc") == 0)


def test_client_disconnects_free_their_blocks(fuzz_server):
    base = fuzz_server.base
    assert wait_for(lambda: kv_idle(base), 10)
    gen_before = metric(base, "vllm:generation_tokens_total")
    max_tokens, n_streams, n_raw = 200, 6, 3
    http = httpx.Client(base_url=base, timeout=60)
    # Streams (chat and completions) read a little, then closed mid-generation.
    responses = []
    for i in range(n_streams):
        path, body = stream_request(f"disconnect me {i}", max_tokens, chat=i % 2 == 1)
        responses.append(http.send(http.build_request("POST", path, json=body), stream=True))
    for r in responses:
        assert r.status_code == 200
        events = sse_events(r)
        for _ in range(3):
            next(events)
    live_mid = metric(base, "dspark_kv_live_tokens")
    for r in responses:
        r.close()
    # Non-streaming requests whose socket is closed before the answer.
    for i in range(n_raw):
        body = json.dumps({"model": MODEL, "prompt": f"raw {i}", "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", fuzz_server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.05)
    t0 = time.monotonic()
    freed = wait_for(lambda: kv_idle(base), 10)
    freed_after = time.monotonic() - t0
    generated = metric(base, "vllm:generation_tokens_total") - gen_before
    record_summary("disconnects", requests=n_streams + n_raw, live_tokens_mid=int(live_mid),
                   freed_after_s=round(freed_after, 2), tokens_generated=int(generated),
                   tokens_if_not_cancelled=(n_streams + n_raw) * max_tokens)
    assert live_mid > 0, "the streams were not running when closed"
    assert freed, "KV blocks or running requests left behind by disconnected clients"
    # Cancelled means the engine stopped generating for them, not just that the answer was dropped.
    assert generated < (n_streams + n_raw) * max_tokens
    assert httpx.get(base + "/health").status_code == 200


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    ranks = {}
    for pid in children(launcher_pid):
        args = cmdline(pid)
        if "--rank" in args:
            ranks[int(args[args.index("--rank") + 1])] = pid
    return ranks


def test_killing_rank_1_fails_fast_with_client_errors_and_nonzero_exit():
    server = Server(["--world-size", "2", "--max-model-len", "512", "--kv-pool-tokens", "4096"])
    try:
        ranks = _rank_pids(server.proc.pid)
        assert set(ranks) == {0, 1}, ranks
        http = httpx.Client(base_url=server.base, timeout=httpx.Timeout(60, read=FAIL_FAST_S * 2))
        path, body = stream_request("a stream that rank 1 will not finish", 480)
        resp = http.send(http.build_request("POST", path, json=body), stream=True)
        assert resp.status_code == 200
        events = sse_events(resp)
        for _ in range(3):
            next(events)
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        outcome, done_normally = "stream ended", False
        try:
            for ev in events:
                if ev == "[DONE]":
                    done_normally = True
                elif "error" in ev:
                    outcome = f"error event: {ev['error'].get('message', '')[:120]}"
                    break
        except httpx.HTTPError as e:  # connection cut: also an error the client sees
            outcome = f"transport error: {type(e).__name__}"
        client_saw_error_s = time.monotonic() - killed
        try:
            code = server.proc.wait(timeout=FAIL_FAST_S)
        except subprocess.TimeoutExpired:
            code = None
        exit_s = time.monotonic() - killed
        rank0_gone = wait_for(lambda: not os.path.exists(f"/proc/{ranks[0]}") or
                              open(f"/proc/{ranks[0]}/stat").read().split()[2] == "Z", 5)
        record_summary("kill_rank1", requests=1, client_outcome=repr(outcome),
                       client_error_after_s=round(client_saw_error_s, 2), exit_code=code,
                       exit_after_s=round(exit_s, 2))
        assert not done_normally and outcome != "stream ended", "the client was not told the request failed"
        assert client_saw_error_s < FAIL_FAST_S
        assert code is not None, f"the server still runs {FAIL_FAST_S}s after rank 1 died"
        assert code != 0
        assert rank0_gone, "rank 0 outlived the launcher"
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        for pid in _rank_pids_safe(server):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _rank_pids_safe(server: Server) -> list[int]:
    try:
        return list(_rank_pids(server.proc.pid).values())
    except OSError:
        return []


@pytest.mark.parametrize("world_size", [1, 2])
def test_sigterm_drains_in_flight_requests(world_size):
    server = Server(["--world-size", str(world_size), "--max-model-len", "512", "--kv-pool-tokens", "4096"])
    try:
        pid = server.proc.pid
        # The whole process tree: with two ranks the server process is the launcher.
        rss = rss_bytes(pid) + sum(rss_bytes(c) for c in children(pid))
        http = httpx.Client(base_url=server.base, timeout=60)
        max_tokens = 120
        streams = []
        for i in range(4):
            path, body = stream_request(f"drain me {i}", max_tokens, chat=i % 2 == 1)
            r = http.send(http.build_request("POST", path, json=body), stream=True)
            assert r.status_code == 200
            events = sse_events(r)
            next(events)
            streams.append(events)
        server.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # New work is refused while draining (connection refused or 503), never served.
        time.sleep(0.2)
        try:
            late = httpx.post(server.base + "/v1/completions", timeout=10,
                              json={"model": MODEL, "prompt": "late", "max_tokens": 2}).status_code
        except httpx.HTTPError:
            late = "refused"
        finished = []
        for events in streams:
            evs = list(events)
            assert evs[-1] == "[DONE]", evs[-3:]
            usage = evs[-2]["usage"]
            finishes = [c["finish_reason"] for e in evs[:-1] for c in e.get("choices", []) if c.get("finish_reason")]
            finished.append((usage["completion_tokens"], finishes))
        code = server.proc.wait(timeout=30)
        drain_s = time.monotonic() - t0
        record_summary(f"sigterm_drain_ws{world_size}", requests=len(streams), late_request=late,
                       drain_s=round(drain_s, 2), exit_code=code, rss_mib=round(rss / 2**20, 1))
        assert all(f == (max_tokens, ["length"]) for f in finished), finished
        assert late != 200, "a request that arrived after SIGTERM was served"
        assert code == 0, server.output()[-3000:]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
