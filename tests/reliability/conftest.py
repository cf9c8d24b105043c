"""pytest wiring of the reliability suite: the shared fuzzed server and the figures section.

Helpers live in reliability_support.py (tests import from there, see its docstring).
"""

from __future__ import annotations

import pytest

from reliability_support import FUZZ_MAX_BODY, FUZZ_MAX_MODEL_LEN, FUZZ_MAX_NUM_SEQS, SUMMARIES, start

# With tests/e2e and tests/reliability in one run, pytest leaves this module as `conftest` in
# sys.modules, and the e2e tests do `from conftest import ...`: give them every plain name their
# own conftest defines (not its fixtures or hooks, which pytest registers from that file itself).
import dspark_e2e_conftest as _e2e  # noqa: E402


def _is_fixture(obj) -> bool:
    return hasattr(obj, "_fixture_function_marker") or hasattr(obj, "_pytestfixturefunction")


for _name, _obj in vars(_e2e).items():
    if not _name.startswith(("__", "pytest_")) and _name not in globals() and not _is_fixture(_obj):
        globals()[_name] = _obj


def pytest_terminal_summary(terminalreporter):
    if SUMMARIES:
        terminalreporter.section("reliability figures")
        for line in SUMMARIES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def fuzz_server():
    yield from start([
        "--max-model-len", str(FUZZ_MAX_MODEL_LEN),
        "--kv-pool-tokens", "2048",
        "--max-num-seqs", str(FUZZ_MAX_NUM_SEQS),
        "--max-request-body-bytes", str(FUZZ_MAX_BODY),
    ])
