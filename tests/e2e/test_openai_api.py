"""The real `dspark-server` binary, spoken to with the official `openai` client.

The tiny model's weights are random, so its text means nothing; these tests check what the
API promises for ANY model: greedy output is reproducible and identical streamed or not,
parameters change the output exactly as specified (stop strings, stop token ids, logit bias,
top_k=1 == greedy, seeds), usage counts match, and every bad input gets the right
OpenAI-shaped error. Run: `pytest tests/e2e` after `cargo build -p dspark-server`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import MAX_BODY, MAX_MODEL_LEN, MAX_NUM_SEQS, SERVED_NAME, model_dir

MODEL = SERVED_NAME
GREEDY = {"temperature": 0.0}
HELLO = [{"role": "user", "content": "Hello! Who are you?"}]


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)


def _ids(logprobs_content) -> list[int]:
    """Token ids from logprob entries of a request made with return_tokens_as_token_ids."""
    return [int(e.token.removeprefix("token_id:")) for e in logprobs_content]


def _greedy_ids(client, prompt="The quick brown fox", n=16) -> list[int]:
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=n, logprobs=0, **GREEDY,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------- endpoints around generation


def test_health_ready_models_openapi(server, client):
    assert httpx.get(server.base + "/health").status_code == 200
    assert httpx.get(server.base + "/ready").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    doc = httpx.get(server.base + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics"):
        assert path in doc["paths"]


def test_metrics_use_vllm_names(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, **GREEDY)
    text = httpx.get(server.base + "/metrics").text
    label = f'model_name="{MODEL}"'
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "dspark_kv_pool_tokens", "dspark_kv_live_tokens", "dspark_max_full_length_concurrency",
        "dspark_kv_recent_blocks", "dspark_kv_recent_blocks_used",
    ):
        assert re.search(rf"^{re.escape(name)}\{{{re.escape(label)}", text, re.M), name
    prompt_tokens = float(re.search(rf"^vllm:prompt_tokens_total\{{{label}\}} (\S+)", text, re.M).group(1))
    gen_tokens = float(re.search(rf"^vllm:generation_tokens_total\{{{label}\}} (\S+)", text, re.M).group(1))
    assert prompt_tokens > 0 and gen_tokens >= 3
    pool = float(re.search(rf"^dspark_kv_pool_tokens\{{{label}\}} (\S+)", text, re.M).group(1))
    assert pool >= 4096
    # Recent blocks: at least one, at most one per block of the pool (docs/KV.md).
    recent = float(re.search(rf"^dspark_kv_recent_blocks\{{{label}\}} (\S+)", text, re.M).group(1))
    block = float(re.search(r'block_size="(\d+)"', text).group(1))
    assert 1 <= recent <= pool / block


# ---------------------------------------------------------------- chat and completions


def test_chat_non_stream_shape_and_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, **GREEDY)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    args = dict(model=MODEL, messages=HELLO, max_tokens=24, seed=1, **GREEDY,
                extra_body={"chat_template_kwargs": {"thinking": False}})
    full = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (full.choices[0].message.content or "")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_equals_non_stream(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, **GREEDY)
    full = client.completions.create(**args)
    assert full.object == "text_completion"
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # Without include_usage, no usage chunk.
    plain = list(client.completions.create(stream=True, **args))
    assert all(c.usage is None for c in plain)


def test_greedy_is_deterministic_and_batch_independent(client):
    prompts = [f"Request number {i} says" for i in range(6)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, **GREEDY).choices[0].text
             for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(
            lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=16, **GREEDY).choices[0].text,
            prompts))
    assert together == alone


def test_max_tokens_ignore_eos_and_max_completion_tokens(client):
    r = client.completions.create(model=MODEL, prompt="Count:", max_tokens=7, **GREEDY,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=5, **GREEDY,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_max_tokens_omitted_fills_to_the_ceiling(client):
    prompt = _greedy_ids(client, n=4)
    r = client.completions.create(model=MODEL, prompt=prompt, **GREEDY, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == MAX_MODEL_LEN - len(prompt)
    assert r.choices[0].finish_reason == "length"


def test_seed_reproduces_sampling(client):
    args = dict(model=MODEL, prompt="Random words:", max_tokens=16, temperature=1.0,
                extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **args).choices[0].text
    b = client.completions.create(seed=1234, **args).choices[0].text
    c = client.completions.create(seed=4321, **args).choices[0].text
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy(client):
    greedy = client.completions.create(model=MODEL, prompt="Sampling", max_tokens=12, **GREEDY).choices[0].text
    k1 = client.completions.create(model=MODEL, prompt="Sampling", max_tokens=12, temperature=1.0, seed=5,
                                   extra_body={"top_k": 1}).choices[0].text
    p0 = client.completions.create(model=MODEL, prompt="Sampling", max_tokens=12, temperature=1.0, seed=5,
                                   top_p=1e-6).choices[0].text
    assert k1 == greedy and p0 == greedy


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=6, temperature=1.0, seed=9,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    chunks = list(client.completions.create(model=MODEL, prompt="n", n=2, max_tokens=4, stream=True,
                                            temperature=1.0, seed=9, extra_body={"ignore_eos": True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="Stop test", max_tokens=30, **GREEDY,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 12, "the tiny model should produce some text"
    stop = base[8:11]
    cut = base[: base.index(stop)]
    r = client.completions.create(model=MODEL, prompt="Stop test", max_tokens=30, stop=[stop], **GREEDY,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt="Stop test", max_tokens=30, stop=stop,
                                              stream=True, **GREEDY, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut
    r = client.completions.create(model=MODEL, prompt="Stop test", max_tokens=30, stop=[stop], **GREEDY,
                                  extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert r.choices[0].text == cut + stop


def test_stop_token_ids_and_min_tokens(client):
    ids = _greedy_ids(client, "Stop ids", 16)
    target = ids[5]
    first = ids.index(target)
    r = client.completions.create(model=MODEL, prompt="Stop ids", max_tokens=16, **GREEDY,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [target]})
    assert r.usage.completion_tokens == first + 1 and r.choices[0].finish_reason == "stop"
    # min_tokens masks the stop id until enough tokens exist.
    r = client.completions.create(model=MODEL, prompt="Stop ids", max_tokens=16, **GREEDY,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [target],
                                              "min_tokens": first + 2})
    assert r.usage.completion_tokens >= first + 2


def test_logit_bias_forces_a_token(client):
    forced = _greedy_ids(client, "bias", 3)[1]
    r = client.completions.create(model=MODEL, prompt="bias", max_tokens=6, logprobs=0, **GREEDY,
                                  logit_bias={str(forced): 100},
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert r.choices[0].logprobs.tokens == [f"token_id:{forced}"] * 6


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, logprobs=True, top_logprobs=3,
                                       **GREEDY, extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 8
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy picks the most likely token.
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token or "\ufffd" in e.token


def test_completion_logprobs_and_token_ids(client):
    r = client.completions.create(model=MODEL, prompt="logprobs", max_tokens=5, logprobs=2, **GREEDY,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(re.fullmatch(r"token_id:\d+", t) for t in lp.tokens)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_token_id_prompts_match_text_prompts(client):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    text = "Token ids and text give the same prompt"
    ids = tok.encode(text, add_special_tokens=False).ids
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=10, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:5]], max_tokens=10, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text


def test_echo(client):
    r = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=4, echo=True, **GREEDY)
    assert r.choices[0].text.startswith("Echo me")


def test_thinking_on_and_off(client):
    args = dict(model=MODEL, messages=HELLO, max_tokens=16, **GREEDY)
    on = client.chat.completions.create(**args, extra_body={"chat_template_kwargs": {"thinking": True},
                                                            "ignore_eos": True})
    off = client.chat.completions.create(**args, extra_body={"chat_template_kwargs": {"thinking": False},
                                                             "ignore_eos": True})
    # Same prompt length (<think> vs </think>), different prompt, so different continuations.
    assert on.usage.prompt_tokens == off.usage.prompt_tokens
    off_msg = off.choices[0].message
    assert getattr(off_msg, "reasoning_content", None) is None
    on_msg = on.choices[0].message
    # Thinking on: the output starts inside the reasoning block, so there is reasoning unless the
    # model closed the block at once; either way 16 tokens of output are somewhere.
    assert (getattr(on_msg, "reasoning_content", None) or "") + (on_msg.content or "") != ""
    assert on.usage.completion_tokens == off.usage.completion_tokens == 16


def test_tools_are_rendered_and_calls_well_formed(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, **GREEDY)
    with_tools = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice="auto",
                                                max_tokens=8, **GREEDY)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    none = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice="none",
                                          max_tokens=8, **GREEDY)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    for call in with_tools.choices[0].message.tool_calls or []:
        assert call.type == "function" and call.function.name == "get_weather"
        json.loads(call.function.arguments)
    # A tool-call round trip is accepted as history.
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=4, **GREEDY)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_client_disconnect_cancels_the_request(server, client):
    stream = client.completions.create(model=MODEL, prompt="long", max_tokens=200, stream=True, **GREEDY,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    label = f'model_name="{MODEL}"'
    while time.monotonic() < deadline:
        text = httpx.get(server.base + "/metrics").text
        running = float(re.search(rf"^vllm:num_requests_running\{{{label}\}} (\S+)", text, re.M).group(1))
        live = float(re.search(rf"^dspark_kv_live_tokens\{{{label}\}} (\S+)", text, re.M).group(1))
        recent = float(re.search(rf"^dspark_kv_recent_blocks_used\{{{label}\}} (\S+)", text, re.M).group(1))
        if running == 0 and live == 0 and recent == 0:
            return
        time.sleep(0.1)
    pytest.fail("the cancelled request kept running or kept its KV blocks")


# ---------------------------------------------------------------- errors


def test_malformed_json_and_wrong_types(server):
    url = server.base + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "tiny-dsv4", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": MODEL, "messages": HELLO, "temperature": "hot"})
    assert r.status_code == 400 and "invalid type" in _error(r)["message"]
    r = httpx.post(url, json={"model": MODEL, "messages": "hello"})
    assert r.status_code == 400
    r = httpx.post(server.base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "ten"})
    assert r.status_code == 400
    r = httpx.post(server.base + "/v1/completions", json={"model": MODEL})
    assert r.status_code == 400


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="x", max_tokens=2)


def test_prompt_over_max_model_len(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN + 1), max_tokens=1)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[5] * MAX_MODEL_LEN)


def test_max_tokens_over_the_ceiling(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 10, max_tokens=MAX_MODEL_LEN)
    assert e.value.status_code == 400 and "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=MAX_MODEL_LEN)


def test_bad_parameter_values(client):
    bad = [
        dict(n=MAX_NUM_SEQS + 1),
        dict(n=0),
        dict(temperature=-0.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(max_tokens=0),
        dict(logprobs=21),
        dict(logit_bias={"not-a-token": 1}),
        dict(logit_bias={"999999999": 1}),
        dict(extra_body={"top_k": -2}),
        dict(extra_body={"min_tokens": 10}, max_tokens=5),
        dict(extra_body={"stop_token_ids": [-1]}),
        dict(prompt=[999999999]),
        dict(prompt=""),
        dict(stream_options={"include_usage": True}),
    ]
    for kwargs in bad:
        args = dict(model=MODEL, prompt="x", max_tokens=2) | kwargs
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**args)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, top_logprobs=30, logprobs=True)


def test_huge_body_is_413(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (2 * MAX_BODY), "max_tokens": 1}).encode()
    r = httpx.post(server.base + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    _error(r)


def test_queue_full_is_429(one_slot_server):
    c = openai.OpenAI(base_url=one_slot_server.base + "/v1", api_key="x", max_retries=0, timeout=120)
    long = dict(model=MODEL, prompt="busy", max_tokens=400, **GREEDY, extra_body={"ignore_eos": True})
    first = c.completions.create(stream=True, **long)
    next(iter(first))  # the first request now runs: the single slot is taken
    results = {}

    def waiting():
        try:
            results["second"] = c.completions.create(**(long | {"max_tokens": 2}))
        except openai.APIStatusError as e:  # pragma: no cover - reported below
            results["second"] = e

    t = threading.Thread(target=waiting)
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(one_slot_server.base + "/metrics").text
        if re.search(r"^vllm:num_requests_waiting\{[^}]*\} 1", text, re.M):
            break
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(**(long | {"max_tokens": 2}))
    assert e.value.status_code == 429
    first.close()  # cancelling the first lets the waiting one run
    t.join(60)
    assert not isinstance(results.get("second"), Exception), results
    assert results["second"].usage.completion_tokens == 2


def test_api_key(keyed_server):
    base = keyed_server.base
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 401 and _error(r)
    good = openai.OpenAI(base_url=base + "/v1", api_key="sk-e2e-secret", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(base + open_path).status_code == 200


# ---------------------------------------------------------------- two ranks


def test_two_rank_group_gives_the_same_greedy_output(client, group_server):
    group = openai.OpenAI(base_url=group_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    for prompt in ("Tensor parallel", "Two ranks, one answer"):
        args = dict(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY, extra_body={"ignore_eos": True})
        assert group.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


# ---------------------------------------------------------------- KV cache dtype (--kv-cache-dtype)


def _cache_config(base: str) -> dict[str, str]:
    text = httpx.get(base + "/metrics").text
    m = re.search(r'^vllm:cache_config_info\{([^}]*)\} 1\.0$', text, re.M)
    assert m, "no vllm:cache_config_info in /metrics"
    return dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))


def test_fp8_kv_cache_serves_and_reports_its_dtype(server, fp8_server):
    fp8 = openai.OpenAI(base_url=fp8_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    r = fp8.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, **GREEDY)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens == 8
    # Greedy stays deterministic and streaming equals non-streaming with a lossy pool.
    args = dict(model=MODEL, prompt="FP8 records", max_tokens=12, **GREEDY, extra_body={"ignore_eos": True})
    once = fp8.completions.create(**args).choices[0].text
    assert fp8.completions.create(**args).choices[0].text == once
    streamed = "".join(c.choices[0].text for c in fp8.completions.create(**args, stream=True) if c.choices)
    assert streamed == once
    assert _cache_config(fp8_server.base)["cache_dtype"] == "fp8"
    f32 = _cache_config(server.base)
    assert f32["cache_dtype"] == "auto"
    # Same --kv-pool-tokens: the same blocks (the records only shrink each block).
    assert _cache_config(fp8_server.base)["num_gpu_blocks"] == f32["num_gpu_blocks"]


def test_fp8_kv_two_rank_group_gives_the_same_greedy_output(fp8_server, fp8_group_server):
    one = openai.OpenAI(base_url=fp8_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    two = openai.OpenAI(base_url=fp8_group_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    for prompt in ("Tensor parallel", "Two ranks, one answer"):
        args = dict(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY, extra_body={"ignore_eos": True})
        assert two.completions.create(**args).choices[0].text == one.completions.create(**args).choices[0].text


def test_unsupported_kv_cache_dtype_is_a_clear_start_error():
    from conftest import _binary

    binary = _binary()
    if binary is None:
        pytest.skip("dspark-server is not built")
    out = subprocess.run(
        [str(binary), "serve", "--model", str(model_dir()), "--device", "cpu", "--port", "0",
         "--kv-cache-dtype", "nvfp4"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "--kv-cache-dtype nvfp4 is not implemented" in out.stdout + out.stderr


# ---------------------------------------------------------------- DSpark speculative decoding

SPEC_PROMPTS = ("The quick brown fox", "Speculate, then verify", "a a a a a a a a", "1, 2, 3, 4, 5,")


def _spec_counters(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(vllm:spec_decode_[a-z_]+_total)\{([^}]*)\} (\S+)$', line)
        if m:
            pos = re.search(r'position="(\d+)"', m.group(2))
            out[m.group(1) + (f"[{pos.group(1)}]" if pos else "")] = float(m.group(3))
    return out


def test_dspark_speculation_gives_the_same_greedy_output(client, spec_server):
    spec = openai.OpenAI(base_url=spec_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    for prompt in SPEC_PROMPTS:
        args = dict(model=MODEL, prompt=prompt, max_tokens=24, **GREEDY, extra_body={"ignore_eos": True})
        assert spec.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text
    # Eight at once, different lengths: batching with drafts changes nothing.
    def both(i):
        args = dict(model=MODEL, prompt=f"request {i}: " + "x" * i, max_tokens=4 + 3 * i, **GREEDY,
                    extra_body={"ignore_eos": True})
        return spec.completions.create(**args).choices[0].text, client.completions.create(**args).choices[0].text
    with ThreadPoolExecutor(8) as ex:
        for a, b in ex.map(both, range(8)):
            assert a == b
    # Stops still cut exactly (a stop token inside an accepted block ends the choice there).
    plain = client.completions.create(model=MODEL, prompt="stop here", max_tokens=16, **GREEDY,
                                      logprobs=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    ids = [int(t.removeprefix("token_id:")) for t in plain.choices[0].logprobs.tokens]
    args = dict(model=MODEL, prompt="stop here", max_tokens=16, **GREEDY, logprobs=0,
                extra_body={"stop_token_ids": [ids[5]], "return_tokens_as_token_ids": True})
    r, want = spec.completions.create(**args), client.completions.create(**args)
    assert r.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
    assert r.choices[0].finish_reason == want.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == want.usage.completion_tokens == ids.index(ids[5]) + 1


def test_dspark_seeded_sampling_reproduces(spec_server):
    spec = openai.OpenAI(base_url=spec_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    args = dict(model=MODEL, prompt="Sample me", max_tokens=20, temperature=0.9, top_p=0.9, seed=1234,
                extra_body={"ignore_eos": True})
    assert spec.completions.create(**args).choices[0].text == spec.completions.create(**args).choices[0].text


def test_dspark_spec_decode_counters_rise(spec_server):
    spec = openai.OpenAI(base_url=spec_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    before = _spec_counters(spec_server.base)
    spec.completions.create(model=MODEL, prompt="count my drafts", max_tokens=20, **GREEDY,
                            extra_body={"ignore_eos": True})
    after = _spec_counters(spec_server.base)
    drafts = "vllm:spec_decode_num_drafts_total"
    draft_tokens = "vllm:spec_decode_num_draft_tokens_total"
    accepted = "vllm:spec_decode_num_accepted_tokens_total"
    assert after[drafts] > before.get(drafts, 0)
    assert after[draft_tokens] - before.get(draft_tokens, 0) <= 3 * (after[drafts] - before.get(drafts, 0))
    assert after[draft_tokens] > before.get(draft_tokens, 0)
    assert after[accepted] <= after[draft_tokens]
    per_pos = sum(v for k, v in after.items() if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total["))
    assert per_pos == after[accepted]


def test_dspark_two_rank_group_gives_the_same_greedy_output(client, spec_group_server):
    group = openai.OpenAI(base_url=spec_group_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    for prompt in SPEC_PROMPTS[:2]:
        args = dict(model=MODEL, prompt=prompt, max_tokens=16, **GREEDY, extra_body={"ignore_eos": True})
        assert group.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


# ---------------------------------------------------------------- graceful shutdown


def test_sigterm_finishes_or_cancels_in_flight_then_exits_0():
    from conftest import Server

    server = Server(["--max-model-len", "4096", "--kv-pool-tokens", "8192", "--shutdown-timeout-secs", "1"])
    try:
        c = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.completions.create(model=MODEL, prompt="never ending", max_tokens=4000, stream=True,
                                      **GREEDY, extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        server.proc.send_signal(signal.SIGTERM)
        finishes = [ch.choices[0].finish_reason for ch in it if ch.choices and ch.choices[0].finish_reason]
        # Cancelled at the deadline, well before 4000 tokens: the stream still ends properly.
        assert finishes == ["abort"]
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
