"""Fixtures for tests that start real processes (helpers in `procs.py`)."""

from __future__ import annotations

import pytest

from tests.integration import procs


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on a free port for the module; skipped where redis-server is not installed."""
    if not procs.redis_available():
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    server = procs.start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_bank_dir(tmp_path_factory):
    """A tiny two-shard synthetic bank (4/16/64 nodes, float16), built once per module."""
    return procs.build_test_bank(tmp_path_factory.mktemp("bank") / "tiny")
