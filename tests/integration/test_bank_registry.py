"""Registration in a real Redis: TTL, heartbeat, deregistration, surviving an absent Redis, listing."""

from __future__ import annotations

import asyncio

import pytest
import redis

from services.memory_bank.registry import Registration, connect, list_replicas, replica_key, replica_record
from tests.integration import procs

pytestmark = pytest.mark.integration


def test_register_heartbeat_list_and_deregister(redis_server):
    record = replica_record("bank1", "0", "r1", "127.0.0.1:1234", [(1, 0), (1, 1)])
    sync = redis.Redis.from_url(redis_server.url, decode_responses=True)
    sync.set("hiermem:bank:bank1:replica:0:junk", "not json")

    async def scenario():
        reg = Registration(redis_server.url, record, ttl_s=1.0, heartbeat_s=0.2)
        await reg.start()
        assert reg.registered is True
        await asyncio.sleep(1.5)  # beyond the TTL: only heartbeats keep it
        assert sync.exists(replica_key("bank1", "0", "r1"))
        assert 0 < sync.pttl(reg.key) <= 1000
        client = connect(redis_server.url)
        listing = await list_replicas(client, "bank1")
        assert await list_replicas(client, "other-bank") == {}
        await reg.stop()
        after = await list_replicas(client, "bank1")
        await client.aclose()
        return listing, after

    listing, after = asyncio.run(scenario())
    assert list(listing) == ["0"] and listing["0"][0]["address"] == "127.0.0.1:1234"
    assert listing["0"][0]["owned"] == [[1, 0], [1, 1]]
    assert after == {}  # deleted on stop, and the malformed record was ignored
    sync.close()


def test_registers_once_redis_appears():
    port = procs.free_port()
    record = replica_record("bank2", "1", "r9", "h:1", [(1, 2)])

    async def scenario():
        reg = Registration(f"redis://127.0.0.1:{port}/0", record, ttl_s=2.0, heartbeat_s=0.2)
        await reg.start()  # Redis is not there: no exception, not registered
        assert reg.registered is False
        server = procs.start_redis(port)
        try:
            for _ in range(50):
                await asyncio.sleep(0.1)
                if reg.registered:
                    break
            assert reg.registered is True
            assert redis.Redis(port=port).exists(replica_key("bank2", "1", "r9"))
            await reg.stop()
        finally:
            server.stop()

    if not procs.redis_available():
        pytest.skip("redis-server not installed")
    asyncio.run(scenario())
