"""In-process shard servers over a tiny bank: real gRPC on loopback, no subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from memory_store import Bank
from services.memory_bank.server import create_server
from services.memory_bank.settings import BankServerSettings
from tests.integration.procs import build_test_bank


@pytest.fixture(scope="session")
def bank_dir(tmp_path_factory):
    """Two shards, 4/16/64 nodes, d=128, float16; node (3, 20) deleted."""
    return build_test_bank(tmp_path_factory.mktemp("mb") / "bank", absent=[(3, 20)])


@pytest.fixture(scope="session")
def bank(bank_dir):
    return Bank.open(bank_dir)


@contextlib.contextmanager
def running_shards(bank_dir, shards=("0", "1"), **overrides):
    """Serves each shard from a background event loop; yields (shard -> address, shard -> server)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = {}

    async def start():
        for sid in shards:
            settings = BankServerSettings(bank=bank_dir, shard=sid, **overrides)
            server, port = create_server(settings)
            await server.start()
            servers[sid] = server

    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield {sid: f"127.0.0.1:{s.port}" for sid, s in servers.items()}, servers
    finally:
        async def stop():
            for s in servers.values():
                await s.shutdown(grace_s=0)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture(scope="module")
def shards(bank_dir):
    """Both shards served in-process with small chunks (so blocks span several chunks)."""
    with running_shards(bank_dir, chunk_bytes=4096, max_nodes_per_call=16, hot_cache_bytes=1 << 20) as running:
        yield running
