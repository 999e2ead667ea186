"""The bank client: discovery, one FetchBlocks call per shard, failover between replicas, verification.

    client = BankClient(bank, redis_url="redis://127.0.0.1:6379/0")     # or static_addresses={"0": [...]}
    result = client.fetch(path_refs(path))              # sync, from any thread
    result = await client.afetch(path_refs(path))       # from any asyncio loop (e.g. FastAPI's)
    result.blocks[ref] -> torch.Tensor [L_mem, 3, r, d] in the bank dtype; result.failed[ref] -> reason

Both APIs run the same coroutine on the client's own event-loop thread, which owns the gRPC channels
(one per address, reused) and the Redis refresh task; so a caller's loop never blocks on the network and
grpc.aio channels never cross loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import crc32c
import grpc
import torch

from memory_store import NodeRef
from memory_store.errors import BankError

from . import registry, wire
from ._gen import memory_bank_pb2 as pb
from .servicer import SERVICE_NAME
from .settings import MAX_MESSAGE_BYTES

if TYPE_CHECKING:  # pragma: no cover
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

FETCH_METHOD = f"/{SERVICE_NAME}/FetchBlocks"
# Codes after which another replica may well succeed. NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION and
# RESOURCE_EXHAUSTED describe the request or the bank, which every replica of a shard shares.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FetchResult:
    """What one fetch got: every requested node is in exactly one of `blocks` and `failed`."""

    blocks: dict[NodeRef, torch.Tensor] = field(default_factory=dict)  # [L_mem, 3, r_l, d], bank dtype
    failed: dict[NodeRef, str] = field(default_factory=dict)  # node -> why it could not be had
    nbytes: int = 0  # block bytes received
    failovers: int = 0  # replicas given up on during this fetch


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


class _AttemptFailed(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code


class BankClient:
    """Fetches blocks of `bank` (a `memory_store.Bank`: manifest + tree are enough) from its shard servers.

    Args:
        bank: the bank; its tree says which shard holds a node, its manifest the crc32c of every block.
        redis_url: discover replicas under the bank's id in Redis (refreshed every `refresh_s`; the last
            known replicas of a shard are kept while Redis is away or lists none).
        static_addresses: shard id -> ["host:port", ...], used alongside (or instead of) Redis.
        timeout_s: default deadline of a whole `fetch`.
        attempt_timeout_s: deadline of one call to one replica, so a hung replica leaves time to fail over.
        max_nodes_per_call / max_bytes_per_call: split a shard's nodes into calls within the server limits.
        failure_memory_s: how long a replica that failed is tried after the others.
        tls_ca_file: PEM CA bundle to verify the servers by: dial over TLS (else plaintext).
        tls_cert_file / tls_key_file: this client's certificate and key, for servers that require
            mutual TLS.
        tls_server_name: the name to expect in the servers' certificates, when it is not the dialled host.
        channel_idle_s: a channel to an address that discovery no longer lists is closed once unused
            this long.
    """

    def __init__(self, bank, redis_url: str | None = None,
                 static_addresses: Mapping[str, Sequence[str] | str] | None = None, *,
                 timeout_s: float = 10.0, attempt_timeout_s: float = 5.0, refresh_s: float = 2.0,
                 max_nodes_per_call: int = 64, max_bytes_per_call: int = 512 * 2**20,
                 failure_memory_s: float = 30.0, tls_ca_file: str | Path | None = None,
                 tls_cert_file: str | Path | None = None, tls_key_file: str | Path | None = None,
                 tls_server_name: str | None = None, channel_idle_s: float = 60.0) -> None:
        if redis_url is None and not static_addresses:
            raise ValueError("BankClient needs redis_url or static_addresses")
        self.bank = bank
        self.bank_id: str = bank.bank_id
        self.redis_url = redis_url
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.refresh_s = refresh_s
        self.max_nodes_per_call = max_nodes_per_call
        self.max_bytes_per_call = max_bytes_per_call
        self.failure_memory_s = failure_memory_s
        self.channel_idle_s = channel_idle_s
        self._torch_dtype = TORCH_DTYPES[bank.spec.dtype]
        self._credentials = None
        if tls_ca_file is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca_file), private_key=_read(tls_key_file),
                certificate_chain=_read(tls_cert_file))
        elif tls_cert_file is not None or tls_key_file is not None:
            raise ValueError("a client certificate needs tls_ca_file (TLS) as well")
        self._channel_options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_server_name:
            self._channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._static = {str(s): [a] if isinstance(a, str) else list(a) for s, a in (static_addresses or {}).items()}
        self._discovered: dict[str, list[str]] = {}
        self._failed_at: dict[str, float] = {}
        self._rr = itertools.count()
        self._channels: dict[str, tuple[grpc.aio.Channel, grpc.aio.UnaryStreamMultiCallable]] = {}
        self._last_used: dict[str, float] = {}
        self._redis: aioredis.Redis | None = None
        self._refresh_task: asyncio.Task | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bank-client", daemon=True)
        self._thread.start()
        self._closed = False
        if redis_url is not None:
            self._submit(self._start_discovery(redis_url)).result()

    # --- public API -------------------------------------------------------------------------------------

    def fetch(self, refs: Iterable, timeout_s: float | None = None) -> FetchResult:
        """Fetches the blocks of `refs` (NodeRefs or (level, index) pairs); blocks until done."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("BankClient.fetch called from the client's own loop; use afetch")
        return self._submit(self._fetch(refs, timeout_s)).result()

    async def afetch(self, refs: Iterable, timeout_s: float | None = None) -> FetchResult:
        """`fetch` for asyncio callers: awaits the client's loop without blocking the caller's."""
        return await asyncio.wrap_future(self._submit(self._fetch(refs, timeout_s)))

    def replicas(self) -> dict[str, list[str]]:
        """The current shard -> addresses map (static and discovered)."""
        return self._submit(self._amap()).result()

    def refresh(self) -> bool:
        """Reads Redis now; returns whether it answered."""
        return self._submit(self._refresh_once()).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._submit(self._aclose()).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> BankClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- discovery ---------------------------------------------------------------------------------------

    def _submit(self, coro):
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("BankClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start_discovery(self, redis_url: str) -> None:
        self._redis = registry.connect(redis_url)
        await self._refresh_once()
        self._refresh_task = asyncio.create_task(self._refresh_forever(), name="bank-client discovery")

    async def _refresh_once(self) -> bool:
        if self._redis is None:
            return False
        try:
            listing = await registry.list_replicas(self._redis, self.bank_id)
        except registry.REDIS_ERRORS as exc:
            log.warning("Redis unreachable, keeping the last known replicas: %s", exc)
            return False
        # A shard that Redis lists without replicas (e.g. just after a Redis restart, before the replicas'
        # next heartbeat) keeps its last known addresses: stale ones fail over, missing ones cannot.
        for shard, recs in listing.items():
            self._discovered[shard] = sorted({r["address"] for r in recs})
        await self._close_stale_channels()
        return True

    async def _close_stale_channels(self) -> None:
        """Closes channels to addresses no longer listed (replicas restarted elsewhere) once idle."""
        known = {a for addrs in (await self._amap()).values() for a in addrs}
        now = time.monotonic()
        for addr in [a for a in self._channels if a not in known and now - self._last_used.get(a, 0.0) > self.channel_idle_s]:
            channel, _ = self._channels.pop(addr)
            self._last_used.pop(addr, None)
            self._failed_at.pop(addr, None)
            await channel.close()
            log.info("closed the channel to %s: no longer registered", addr)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._refresh_once()

    async def _amap(self) -> dict[str, list[str]]:
        shards = set(self._static) | set(self._discovered)
        return {s: list(dict.fromkeys(self._discovered.get(s, []) + self._static.get(s, []))) for s in shards}

    def _order(self, addresses: list[str]) -> list[str]:
        """Round-robin among replicas without a recent failure, then the failed ones, oldest failure first."""
        if not addresses:
            return []
        k = next(self._rr) % len(addresses)
        rotated = addresses[k:] + addresses[:k]
        now = time.monotonic()

        def last_failure(addr: str) -> float:
            t = self._failed_at.get(addr, 0.0)
            return t if now - t < self.failure_memory_s else 0.0

        return sorted(rotated, key=last_failure)  # stable: equal keys keep the rotation

    # --- fetching ----------------------------------------------------------------------------------------

    async def _fetch(self, refs: Iterable, timeout_s: float | None) -> FetchResult:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        result = FetchResult()
        groups: dict[str, list[NodeRef]] = {}
        for raw in dict.fromkeys(NodeRef(int(r[0]), int(r[1])) for r in refs):
            try:
                info = self.bank.block_info(raw)
                holders = self.bank.shards_of(raw)
            except BankError as exc:
                result.failed[raw] = f"invalid node: {exc}"
                continue
            if not info.present:
                result.failed[raw] = "absent from the bank (deleted or never written)"
                continue
            # A node above the shard level is in several shards: join a call that is being made anyway.
            shard = next((s for s in holders if s in groups), holders[0])
            groups.setdefault(shard, []).append(raw)
        parts = await asyncio.gather(*(self._fetch_shard(s, g, deadline) for s, g in groups.items()))
        for part in parts:
            result.blocks.update(part.blocks)
            result.failed.update(part.failed)
            result.nbytes += part.nbytes
            result.failovers += part.failovers
        return result

    def _batches(self, refs: list[NodeRef]) -> list[list[NodeRef]]:
        batches: list[list[NodeRef]] = [[]]
        size = 0
        for ref in refs:
            n = self.bank.spec.bytes_per_block(ref.level)
            if batches[-1] and (len(batches[-1]) >= self.max_nodes_per_call or size + n > self.max_bytes_per_call):
                batches.append([])
                size = 0
            batches[-1].append(ref)
            size += n
        return batches

    async def _fetch_shard(self, shard: str, refs: list[NodeRef], deadline: float) -> FetchResult:
        out = FetchResult()
        addresses = (await self._amap()).get(shard, [])
        if not addresses and await self._refresh_once():
            addresses = (await self._amap()).get(shard, [])
        if not addresses:
            out.failed.update({r: f"no replica known for shard {shard}" for r in refs})
            return out
        for batch in self._batches(refs):
            pending = list(batch)
            order = self._order(addresses)
            i, last_error = 0, "no replica tried"
            while pending and i < len(order):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last_error = f"deadline exceeded after {last_error}"
                    break
                addr = order[i]
                try:
                    await self._call(addr, pending, out, min(remaining, self.attempt_timeout_s))
                except _AttemptFailed as exc:
                    last_error = f"{addr}: {exc}"
                    if exc.code in FAILOVER_CODES:
                        log.info("shard %s replica %s failed (%s); %s", shard, addr, exc,
                                 "failing over" if i + 1 < len(order) else "no replica left")
                        self._failed_at[addr] = time.monotonic()
                        out.failovers += 1
                        i += 1
                    elif exc.code == grpc.StatusCode.NOT_FOUND:
                        out.failed[pending.pop(0)] = last_error  # the stream stopped at this node
                    else:
                        break
            out.failed.update({r: last_error for r in pending})
        return out

    def _stub(self, addr: str) -> grpc.aio.UnaryStreamMultiCallable:
        self._last_used[addr] = time.monotonic()
        entry = self._channels.get(addr)
        if entry is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(addr, self._credentials, options=self._channel_options)
            else:
                channel = grpc.aio.insecure_channel(addr, options=self._channel_options)
            call = channel.unary_stream(FETCH_METHOD, request_serializer=pb.FetchBlocksRequest.SerializeToString,
                                        response_deserializer=wire.decode_chunk)
            entry = self._channels[addr] = (channel, call)
        return entry[1]

    async def _call(self, addr: str, pending: list[NodeRef], out: FetchResult, timeout: float) -> None:
        """One FetchBlocks call; moves each verified block from `pending` to `out.blocks` as it completes."""
        request = pb.FetchBlocksRequest(bank_id=self.bank_id,
                                        nodes=[pb.NodeRef(level=r.level, index=r.index) for r in pending])
        raw: torch.Tensor | None = None  # the block being received, as uint8
        buf: memoryview | None = None  # a writable view of `raw`
        got = crc = 0
        call = self._stub(addr)(request, timeout=timeout)
        try:
            async for chunk in call:
                if chunk.header is not None:
                    if buf is not None:
                        raise _AttemptFailed(grpc.StatusCode.DATA_LOSS, "block header before previous block ended")
                    self._check_header(chunk.header, pending[0] if pending else None)
                    # torch.empty maps fresh pages lazily; bytearray(n) would zero-fill them first (~1 ms/MB)
                    raw = torch.empty(chunk.header.nbytes, dtype=torch.uint8)
                    buf, got, crc = raw.numpy().data, 0, 0  # a writable memoryview of raw's bytes
                if raw is None or buf is None or chunk.offset != got or got + len(chunk.data) > len(buf):
                    raise _AttemptFailed(grpc.StatusCode.DATA_LOSS, "chunk out of order")
                end = got + len(chunk.data)
                buf[got:end] = chunk.data
                crc = crc32c.crc32c(buf[got:end], crc)  # while the chunk is still in the CPU cache
                got = end
                if got == len(buf):
                    ref = pending[0]
                    self._finish_block(ref, raw, crc, out)
                    pending.pop(0)
                    raw = buf = None
        except grpc.aio.AioRpcError as exc:
            raise _AttemptFailed(exc.code(), exc.details() or "") from None
        finally:
            if not call.done():  # we gave up on this replica mid-stream: stop it sending
                call.cancel()
        if buf is not None or pending:
            raise _AttemptFailed(grpc.StatusCode.DATA_LOSS, f"stream ended with {len(pending)} blocks missing")

    def _check_header(self, header: pb.BlockHeader, expected: NodeRef | None) -> None:
        ref = NodeRef(header.node.level, header.node.index)
        if ref != expected:
            raise _AttemptFailed(grpc.StatusCode.DATA_LOSS, f"got block {ref}, expected {expected}")
        if header.bank_id != self.bank_id:
            raise _AttemptFailed(grpc.StatusCode.DATA_LOSS, f"block {ref} is from bank {header.bank_id}")
        info = self.bank.block_info(ref)
        if (tuple(header.shape) != tuple(info.shape) or header.dtype != info.dtype
                or header.nbytes != info.nbytes or header.crc32c != info.crc32c):
            raise _AttemptFailed(grpc.StatusCode.DATA_LOSS, f"block {ref}: header disagrees with the manifest")

    def _finish_block(self, ref: NodeRef, raw: torch.Tensor, actual: int, out: FetchResult) -> None:
        info = self.bank.block_info(ref)
        if actual != info.crc32c:
            raise _AttemptFailed(grpc.StatusCode.DATA_LOSS,
                                 f"block {ref}: crc32c {actual:#010x} != manifest {info.crc32c:#010x}")
        out.blocks[ref] = raw.view(self._torch_dtype).view(info.shape)
        out.nbytes += raw.numel()

    async def _aclose(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        if self._redis is not None:
            await self._redis.aclose()
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
