"""Discovery through Redis (docs/design.md §5, with the key layout).

A replica writes `hiermem:bank:<bank_id>:replica:<shard_id>:<replica_id>` -> JSON record with a TTL, and
refreshes it every heartbeat; it deletes the key before draining. Redis is never on the data path: a
replica keeps serving while Redis is away and registers again when it returns; a client keeps the last
map it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def replica_key(bank_id: str, shard_id: str, replica_id: str) -> str:
    return f"hiermem:bank:{bank_id}:replica:{shard_id}:{replica_id}"


def replica_pattern(bank_id: str) -> str:
    return f"hiermem:bank:{bank_id}:replica:*"


def connect(url: str, timeout_s: float = 1.0) -> aioredis.Redis:
    """An asyncio Redis client with short timeouts: discovery must never stall the data path."""
    return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                             decode_responses=True)


def replica_record(bank_id: str, shard_id: str, replica_id: str, address: str,
                   owned: Iterable[tuple[int, int]]) -> dict[str, Any]:
    return {"shard_id": shard_id, "replica_id": replica_id, "address": address,
            "owned": [[int(level), int(index)] for level, index in owned], "bank_id": bank_id,
            "started_at": time.time()}


class Registration:
    """Keeps one replica's record alive in Redis until `stop()`.

    Args:
        redis_url: where Redis is.
        record: the JSON record (see `replica_record`).
        ttl_s: the key's TTL; a replica that dies silently disappears after it.
        heartbeat_s: seconds between refreshes (below ttl_s).
    """

    def __init__(self, redis_url: str, record: dict[str, Any], ttl_s: float, heartbeat_s: float) -> None:
        self.key = replica_key(record["bank_id"], record["shard_id"], record["replica_id"])
        self.record = record
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.heartbeat_s = heartbeat_s
        self._redis = connect(redis_url)
        self._task: asyncio.Task | None = None
        self.registered: bool | None = None  # whether the last attempt succeeded (None: not tried)

    async def start(self) -> None:
        """Registers once now (a failure is logged, not raised) and starts the heartbeat."""
        await self._beat()
        self._task = asyncio.create_task(self._run(), name=f"registration {self.key}")

    async def _beat(self) -> None:
        try:
            await self._redis.set(self.key, json.dumps(self.record), px=self.ttl_ms)
        except REDIS_ERRORS as exc:
            if self.registered is not False:
                log.warning("Redis unreachable, serving on without registration (will retry): %s", exc)
            self.registered = False
            return
        if self.registered is not True:
            log.info("registered %s -> %s", self.key, self.record["address"])
        self.registered = True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._beat()

    async def stop(self) -> None:
        """Stops the heartbeat and deletes the key (best effort: the TTL removes it otherwise)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._redis.delete(self.key)
            log.info("deregistered %s", self.key)
        except REDIS_ERRORS as exc:
            log.warning("could not deregister %s (its TTL will expire it): %s", self.key, exc)
        self.registered = False
        await self._redis.aclose()


def connect_sync(url: str, timeout_s: float = 1.0):
    """A blocking Redis client with the same short timeouts (for the bank client's discovery thread)."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                decode_responses=True)


def _group(raws: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    shards: dict[str, list[dict[str, Any]]] = {}
    for raw in raws:
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            rec = json.loads(raw)
            shards.setdefault(str(rec["shard_id"]), []).append(rec)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed registry record: %.200s", raw)
    return shards


def list_replicas_sync(client, bank_id: str) -> dict[str, list[dict[str, Any]]]:
    """`list_replicas` for a blocking client (raises REDIS_ERRORS)."""
    keys = sorted(client.scan_iter(match=replica_pattern(bank_id), count=500))
    return _group(client.mget(keys)) if keys else {}


async def list_replicas(client: aioredis.Redis, bank_id: str) -> dict[str, list[dict[str, Any]]]:
    """shard id -> replica records registered for `bank_id` (SCAN + MGET; raises REDIS_ERRORS)."""
    keys = [k async for k in client.scan_iter(match=replica_pattern(bank_id), count=500)]
    return _group(await client.mget(sorted(keys))) if keys else {}
