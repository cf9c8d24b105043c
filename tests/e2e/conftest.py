"""Starts and stops the real `dspark-server serve` binary for the end-to-end tests.

The binary is found at $DSPARK_SERVER_BIN, else under $CARGO_TARGET_DIR or ./target
(release before debug). The model is $DSPARK_E2E_MODEL, else the tiny model in the repo.
A server that exits before it is ready fails the test with its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "tiny-dsv4"


def _binary() -> Path | None:
    env = os.environ.get("DSPARK_SERVER_BIN")
    if env:
        return Path(env)
    roots = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    roots.append(REPO / "target")
    for root in roots:
        for profile in ("release", "debug"):
            p = root / profile / "dspark-server"
            if p.exists():
                return p
    return None


def model_dir() -> Path:
    return Path(os.environ.get("DSPARK_E2E_MODEL", REPO / "server/assets/tiny-dsv4"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One running `dspark-server serve` process."""

    def __init__(self, extra_args: list[str], env: dict[str, str] | None = None):
        binary = _binary()
        if binary is None:
            pytest.skip("dspark-server is not built: run `cargo build -p dspark-server`")
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("DSPARK_E2E_LOG_DIR", "/tmp")) / f"dspark-e2e-{self.port}.log"
        self.log = open(self.log_path, "w+b")
        args = [
            str(binary), "serve",
            "--model", str(model_dir()),
            "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--device", os.environ.get("DSPARK_E2E_DEVICE", "cpu"),
            *(["--shutdown-timeout-secs", "5"] if "--shutdown-timeout-secs" not in extra_args else []),
            *extra_args,
        ]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPARK_", "VLLM_"))}
        if os.environ.get("DSPARK_FAKE_ENGINE"):
            full_env["DSPARK_FAKE_ENGINE"] = os.environ["DSPARK_FAKE_ENGINE"]
        full_env.update(env or {})
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        self._wait_ready(float(os.environ.get("DSPARK_E2E_LOAD_TIMEOUT", "900")))

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                out = self.output()
                pytest.fail(f"dspark-server exited with {code} before ready:\n{out[-4000:]}")
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"dspark-server not ready after {timeout}s:\n{self.output()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM and wait: graceful shutdown must end with exit code 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


def _start(extra_args, env=None):
    server = Server(extra_args, env)
    yield server
    code = server.stop()
    assert code == 0, f"dspark-server did not shut down cleanly (exit {code}):\n{server.output()[-4000:]}"


# Small limits so the error paths are cheap to reach.
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 8
MAX_BODY = 1_000_000


@pytest.fixture(scope="session")
def server():
    yield from _start([
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-pool-tokens", "4096",
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-request-body-bytes", str(MAX_BODY),
    ])


@pytest.fixture(scope="session")
def keyed_server():
    yield from _start(["--max-model-len", "128", "--kv-pool-tokens", "1024"], {"VLLM_API_KEY": "sk-e2e-secret"})


@pytest.fixture(scope="session")
def one_slot_server():
    """One running sequence and one waiting request at most: the third concurrent one gets 429."""
    yield from _start([
        "--max-model-len", "512", "--kv-pool-tokens", "2048",
        "--max-num-seqs", "1", "--max-waiting-requests", "1",
    ])


@pytest.fixture(scope="session")
def group_server():
    """`--world-size 2` without `--rank`: the local launcher starts both ranks (TCP on loopback)."""
    yield from _start([
        "--world-size", "2",
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-pool-tokens", "4096",
    ])


@pytest.fixture(scope="session")
def fp8_server():
    """The same profile as `server`, with the KV pool in V4's FP8 records."""
    yield from _start([
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-pool-tokens", "4096",
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--kv-cache-dtype", "fp8",
    ])


@pytest.fixture(scope="session")
def fp8_group_server():
    """Two ranks with the KV pool in FP8 records."""
    yield from _start([
        "--world-size", "2",
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-pool-tokens", "4096",
        "--kv-cache-dtype", "fp8",
    ])


@pytest.fixture(scope="session")
def spec_server():
    """The same profile as `server`, with DSpark speculative decoding (K = 3)."""
    yield from _start([
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-pool-tokens", "4096",
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--speculative-method", "dspark",
        "--num-speculative-tokens", "3",
    ])


@pytest.fixture(scope="session")
def spec_group_server():
    """Two ranks with DSpark speculative decoding (the default K = the block size)."""
    yield from _start([
        "--world-size", "2",
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-pool-tokens", "4096",
        "--speculative-method", "dspark",
    ])
