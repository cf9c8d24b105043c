"""schemathesis hooks, loaded through SCHEMATHESIS_HOOKS by test_schemathesis.py.

- The document lets `model` be any string, so almost every generated body would stop at the 404
  for an unknown model and never reach validation or generation: generated string `model`s are
  replaced by the served model's name (unknown models are covered by test_bad_input.py).
- The document gives no schema for 200 bodies, and its Error schema requires nothing, so
  `openai_response_shape` checks OpenAI's shapes itself: errors are {"error": {message, type,
  param, code}}, completions carry object/id/choices/usage, streams end with `data: [DONE]`.
"""

import json
import os

import schemathesis

SERVED_MODEL = os.environ.get("DSPARK_SCHEMATHESIS_MODEL", "tiny-dsv4")
OBJECTS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion"}


@schemathesis.hook
def map_case(context, case):
    # map_case runs in every phase (map_body does not reach the coverage phase's cases).
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body = {**case.body, "model": SERVED_MODEL}
    return case


@schemathesis.check
def openai_response_shape(ctx, response, case):
    path = case.operation.path
    ctype = response.headers.get("content-type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if response.status_code >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(
                f"{case.method} {path} -> {response.status_code} with a non-JSON body "
                f"({ctype!r}): {response.content[:200]!r}"
            ) from None
        assert isinstance(body, dict) and set(body) == {"error"}, f"error body is not OpenAI's shape: {body}"
        err = body["error"]
        assert {"message", "type", "param", "code"} <= set(err), f"error lacks fields: {err}"
        assert isinstance(err["message"], str) and err["message"], f"empty error message: {err}"
        return True
    if path not in OBJECTS or response.status_code != 200:
        return None
    if ctype.startswith("text/event-stream"):
        events = [line[6:] for line in response.content.decode().splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"stream does not end with [DONE]: {events[-3:]}"
        for ev in events[:-1]:
            chunk = json.loads(ev)
            assert chunk.get("object") == OBJECTS[path] + ("" if path == "/v1/completions" else ".chunk"), chunk
        return True
    body = json.loads(response.content)
    assert body.get("object") == OBJECTS[path], body
    assert body.get("id") and body.get("model") == SERVED_MODEL, body
    assert isinstance(body.get("choices"), list) and body["choices"], body
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    return True
