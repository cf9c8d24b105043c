"""schemathesis against the server's own OpenAPI document (/openapi.json).

Runs the schemathesis CLI (the same tool users would run) with a bounded example count and a
fixed seed: no operation may answer 5xx, every response must match the schema the document
declares for its status code and content type, and (our check) every error is OpenAI's error JSON
and every completion OpenAI's completion shape. Generated `model`s are replaced by the served
name so the bodies reach validation and generation (see schemathesis_hooks.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_support import MODEL, record_summary

EXAMPLES = int(os.environ.get("DSPARK_SCHEMATHESIS_EXAMPLES", "30"))
# openai_response_shape is ours (schemathesis_hooks.py): the document has no 200 body schemas.
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance,openai_response_shape"
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


def _schemathesis() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("schemathesis") or shutil.which("st")
    if not found:
        pytest.skip("schemathesis is not installed (pip install -r tests/requirements.txt)")
    return [found]


def test_schemathesis_no_server_errors_and_schema_conformance(fuzz_server, tmp_path):
    junit = tmp_path / "schemathesis.xml"
    cmd = [
        *_schemathesis(), "--no-color", "run", fuzz_server.base + "/openapi.json",
        "--checks", CHECKS,
        "--max-examples", str(EXAMPLES),
        "--seed", "20261128",
        "--request-timeout", "60",
        "--report", "junit", "--report-junit-path", str(junit),
        "--generation-database", "none",
    ]
    env = dict(os.environ, SCHEMATHESIS_HOOKS=str(HOOKS), DSPARK_SCHEMATHESIS_MODEL=MODEL)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    tests = failures = 0
    if junit.exists():
        text = junit.read_text()
        tests = sum(int(x) for x in re.findall(r'<testsuite[^>]* tests="(\d+)"', text))
        failures = sum(int(x) for x in re.findall(r'<testsuite[^>]* failures="(\d+)"', text))
    requests = re.search(r"(\d+) generated", out)
    record_summary("schemathesis", operations=tests, failed_operations=failures,
                   cases=requests.group(1) if requests else "?", exit_code=proc.returncode)
    assert proc.returncode == 0, out[-8000:]
    assert fuzz_server.proc.poll() is None
