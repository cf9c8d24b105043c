"""Helpers of the reliability suite (imported by its tests, conftest.py and soak.py).

The server process is the e2e suite's `Server` (tests/e2e/conftest.py), loaded under its own
module name: with pytest's default import mode only one module can be called `conftest`, so the
tests import from here, never `from conftest import`. Every test records one summary line
(`record_summary`); conftest.py prints them together at the end of the run.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import httpx

_E2E = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
_spec = importlib.util.spec_from_file_location("dspark_e2e_conftest", _E2E)
e2e = importlib.util.module_from_spec(_spec)
sys.modules["dspark_e2e_conftest"] = e2e
_spec.loader.exec_module(e2e)

Server = e2e.Server
MODEL = e2e.SERVED_NAME
GREEDY = {"temperature": 0.0}

# The fuzzed server's limits; small so that the over-the-limit paths are cheap to reach.
FUZZ_MAX_MODEL_LEN = 256
FUZZ_MAX_NUM_SEQS = 8
FUZZ_MAX_BODY = 1_000_000

SUMMARIES: list[str] = []


def record_summary(test: str, **figures) -> None:
    line = f"RELIABILITY {test}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    SUMMARIES.append(line)
    print(line)


def start(extra_args: list[str]):
    """A session-style fixture body: the server must drain and exit 0 at teardown."""
    yield from e2e._start(extra_args)


# ---------------------------------------------------------------- process and metrics helpers


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc/<pid>/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids.extend(int(t) for t in text)
    return kids


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    m = re.search(rf'^{re.escape(name)}\{{model_name="{MODEL}"\}} (\S+)', text, re.M)
    assert m, f"metric {name} missing from /metrics"
    return float(m.group(1))


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def assert_error_shape(resp: httpx.Response) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    try:
        body = resp.json()
    except ValueError as e:
        raise AssertionError(f"{resp.status_code} body is not JSON: {resp.content[:200]!r}") from e
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), body
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    return err
