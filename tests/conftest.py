"""Shared test set-up: every test starts with the launcher environment it inherited from the shell."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# init_distributed records a one-process group's layout in os.environ (DeepSpeed reads it); a run or
# subprocess started by a later test in the same pytest process would inherit it as its own layout.
LAYOUT_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLOW_TEST_TIMEOUT_S = 2400  # per test marked slow (the default limit is `timeout` in pyproject.toml)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests get a larger time limit than the default one, unless they set their own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


@pytest.fixture(autouse=True)
def restore_launcher_environment() -> Iterator[None]:
    """Put the rank/world-size variables back as they were before the test."""
    saved = {k: os.environ.get(k) for k in LAYOUT_KEYS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
