"""The test suite's own time limits: a hung test fails with its stack trace instead of using up CI's budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HANGS = '''
import threading

def test_waits_forever():
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # a deadlock, as a forked FFmpeg worker's
'''


def test_the_default_suite_has_a_time_limit_for_every_test(request: pytest.FixtureRequest) -> None:
    """pytest-timeout is configured (thread method: it fires inside C waits too), and slow tests get more."""
    from conftest import SLOW_TEST_TIMEOUT_S

    assert float(request.config.getini("timeout")) > 0
    assert request.config.getini("timeout_method") == "thread"
    assert SLOW_TEST_TIMEOUT_S > float(request.config.getini("timeout"))


def test_a_hung_test_fails_at_its_limit_with_its_stack(tmp_path: Path) -> None:
    """Run pytest with the project's configuration on a test that deadlocks: it ends, failing, naming the line."""
    (tmp_path / "test_hang.py").write_text(HANGS)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                           str(tmp_path), "-p", "no:cacheprovider", "--timeout", "3", str(tmp_path / "test_hang.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "Timeout" in out and "test_waits_forever" in out and "lock.acquire()" in out, out[-2000:]


@pytest.mark.slow
def test_slow_tests_get_the_larger_limit(request: pytest.FixtureRequest) -> None:
    """The conftest hook gives a slow test the slow limit (seen from inside the test itself)."""
    from conftest import SLOW_TEST_TIMEOUT_S

    assert request.node.get_closest_marker("timeout").args[0] == SLOW_TEST_TIMEOUT_S
