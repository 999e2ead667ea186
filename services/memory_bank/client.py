"""The bank client: one FetchBlocks call per shard, failover, verification of every block.

    client = BankClient(bank, redis_url="redis://127.0.0.1:6379/0")     # or static_addresses={"0": [...]}
    result = client.fetch(path_refs(path))              # blocking, from any thread
    result = await client.afetch(path_refs(path))       # from an asyncio loop (runs fetch in a thread)
    result.blocks[ref] -> torch.Tensor [L_mem, 3, r, d] in the bank dtype; result.failed[ref] -> reason

One concurrency model: plain threads. `fetch` runs in the caller's thread over grpc's synchronous,
thread-safe channels (one per address, reused); a fetch that touches several shards calls them at once
from a small pool (most fetches touch one shard and use no other thread); while a shard has another
replica left to fail over to, a timer thread gives up on a replica that has not answered in time (see
`_call`); Redis is read by one daemon thread every `refresh_s`. No event loop of its own, so a fetch is
never handed from thread to loop to thread.

Which replicas serve each shard, and in which order to ask them, is the replica set's (replicas.py:
discovery, GetInfo checks, rejects, channels): a replica is used only once it is known to serve this bank
(bank_id) and this shard of this layout. Every block is checked against the local manifest, so one fetch's
blocks always come from the client's bank version.

The client imports nothing from the server's modules (only the generated messages and wire.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import grpc
import torch

from memory_store import Bank, NodeRef
from memory_store.errors import BankError

from ._gen import memory_bank_pb2 as pb
from .replicas import AttemptFailed, ReplicaSet
from .result import FetchResult

log = logging.getLogger(__name__)

# Codes after which another replica may well succeed. FAILED_PRECONDITION (another bank_id) and NOT_FOUND
# (the node is not in that replica's shard: another layout; nodes deleted from our bank are never asked
# for) mean the replica serves another bank version than ours: drop it and use a matching one.
# INVALID_ARGUMENT and RESOURCE_EXHAUSTED describe the request, which every replica would refuse.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.CANCELLED})
MISMATCH_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}

__all__ = ["BankClient", "FetchResult"]


class BankClient:
    """Fetches blocks of `bank` (a `memory_store.Bank`: manifest + tree are enough) from its shard servers.

    Args:
        bank: the bank; its tree says which shard holds a node, its manifest the crc32c of every block.
        redis_url: discover replicas under the bank's id in Redis (refreshed every `refresh_s`; the last
            known replicas of a shard are kept while Redis is away or lists none).
        static_addresses: shard id -> ["host:port", ...], used alongside (or instead of) Redis.
        timeout_s: default deadline of a whole `fetch`.
        attempt_timeout_s: deadline of one call to one replica, so a hung replica leaves time to fail over.
            While another replica is left to ask, a replica must also answer (its first chunk) within half
            the time left of the fetch; one that streams may then use the rest of its call's deadline.
        max_nodes_per_call / max_bytes_per_call: split a shard's nodes into calls within the server limits.
        failure_memory_s: how long a replica that failed is tried after the others.
        tls_ca_file: PEM CA bundle to verify the servers by: dial over TLS (else plaintext).
        tls_cert_file / tls_key_file: this client's certificate and key, for servers that require
            mutual TLS.
        tls_server_name: the name to expect in the servers' certificates, when it is not the dialled host.
        channel_idle_s: a channel to an address that discovery no longer lists is closed once unused
            this long.
        verify_s: how long a replica's GetInfo verdict is trusted (a mismatch error re-checks at once).
        recheck_s: how long a replica found serving another version is skipped before it is asked again
            (it may have been restarted onto ours; it is still tried last, after every other replica).
        on_reject: called with (address, reason) when a replica is dropped for serving another bank
            version or layout (e.g. to count it in a metric).
    """

    def __init__(self, bank: Bank, redis_url: str | None = None,
                 static_addresses: Mapping[str, Sequence[str] | str] | None = None, *,
                 timeout_s: float = 10.0, attempt_timeout_s: float = 5.0, refresh_s: float = 2.0,
                 max_nodes_per_call: int = 64, max_bytes_per_call: int = 512 * 2**20,
                 failure_memory_s: float = 30.0, tls_ca_file: str | Path | None = None,
                 tls_cert_file: str | Path | None = None, tls_key_file: str | Path | None = None,
                 tls_server_name: str | None = None, channel_idle_s: float = 60.0, verify_s: float = 30.0,
                 recheck_s: float = 2.0,
                 on_reject: Callable[[str, str], None] | None = None) -> None:
        if redis_url is None and not static_addresses:
            raise ValueError("BankClient needs redis_url or static_addresses")
        self.bank = bank
        self.bank_id: str = bank.bank_id
        self.redis_url = redis_url
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.max_nodes_per_call = max_nodes_per_call
        self.max_bytes_per_call = max_bytes_per_call
        self._torch_dtype = TORCH_DTYPES[bank.spec.dtype]
        self.replica_set = ReplicaSet(
            bank, redis_url, static_addresses, refresh_s=refresh_s, failure_memory_s=failure_memory_s,
            tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
            tls_server_name=tls_server_name, channel_idle_s=channel_idle_s, verify_s=verify_s,
            recheck_s=recheck_s, on_reject=on_reject)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="bank-client")
        self._closed = threading.Event()

    # --- public API -------------------------------------------------------------------------------------

    def fetch(self, refs: Iterable, timeout_s: float | None = None) -> FetchResult:
        """Fetches the blocks of `refs` (NodeRefs or (level, index) pairs); blocks until done."""
        if self._closed.is_set():
            raise RuntimeError("BankClient is closed")
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
        items = list(groups.items())
        if len(items) == 1:  # the usual case (a path lies in one shard): no other thread involved
            parts = [self._fetch_shard(*items[0], deadline)]
        else:
            parts = list(self._pool.map(lambda it: self._fetch_shard(it[0], it[1], deadline), items))
        for part in parts:
            result.blocks.update(part.blocks)
            result.failed.update(part.failed)
            result.nbytes += part.nbytes
            result.failovers += part.failovers
            result.shard_seconds.update(part.shard_seconds)
        return result

    async def afetch(self, refs: Iterable, timeout_s: float | None = None) -> FetchResult:
        """`fetch` for asyncio callers: runs it in a worker thread, so the caller's loop never blocks."""
        return await asyncio.to_thread(self.fetch, list(refs), timeout_s)

    def replicas(self) -> dict[str, list[str]]:
        """The current shard -> addresses map (static and discovered)."""
        return self.replica_set.replicas()

    def verified_replicas(self, timeout_s: float = 2.0) -> dict[str, list[str]]:
        """shard -> the known replicas that answer GetInfo for this bank, shard and layout now (asks each;
        e.g. to tell whether a new bank version can be served yet)."""
        pairs = [(s, a) for s, addrs in self.replicas().items() for a in addrs]

        def ok(pair: tuple[str, str]) -> bool:
            try:
                self.replica_set.verify(pair[1], pair[0], timeout_s)
                return True
            except AttemptFailed:
                return False

        out: dict[str, list[str]] = {s: [] for s in self.bank.shard_ids}
        for (shard, addr), good in zip(pairs, self._pool.map(ok, pairs), strict=True):
            if good and shard in out:
                out[shard].append(addr)
        return out

    def rejected_replicas(self) -> dict[str, int]:
        """address -> times it was found serving another bank version or shard layout (and dropped)."""
        return self.replica_set.rejected()

    def refresh(self) -> bool:
        """Reads Redis now; returns whether it answered."""
        return self.replica_set.refresh()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.replica_set.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> BankClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- fetching ----------------------------------------------------------------------------------------

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

    def _fetch_shard(self, shard: str, refs: list[NodeRef], deadline: float) -> FetchResult:
        t0 = time.perf_counter()
        out = self._fetch_shard_calls(shard, refs, deadline)
        out.shard_seconds[shard] = time.perf_counter() - t0
        return out

    def _fetch_shard_calls(self, shard: str, refs: list[NodeRef], deadline: float) -> FetchResult:
        out = FetchResult()
        addresses = self.replicas().get(shard, [])
        if not addresses and self.replica_set.refresh():
            addresses = self.replicas().get(shard, [])
        if not addresses:
            out.failed.update({r: f"no replica known for shard {shard}" for r in refs})
            return out
        for batch in self._batches(refs):
            pending = list(batch)
            order = self.replica_set.order(addresses)
            i, last_error = 0, f"no replica of bank {self.bank_id[:12]} for shard {shard} ({len(addresses)} known)"
            while pending and i < len(order):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last_error = f"deadline exceeded after {last_error}"
                    break
                addr = order[i]
                # While another replica is left, a silent one may take at most half the time that remains
                # (and attempt_timeout_s) before it answers, so the fetch can still fail over in time.
                silence_s = min(remaining if i + 1 == len(order) else remaining / 2, self.attempt_timeout_s)
                verified = False
                try:
                    self.replica_set.verify(addr, shard, silence_s)
                    verified = True
                    self._call(addr, pending, out, min(deadline - time.monotonic(), self.attempt_timeout_s),
                               silence_s)
                except AttemptFailed as exc:
                    last_error = f"{addr}: {exc}"
                    if exc.code in FAILOVER_CODES:
                        if exc.code in MISMATCH_CODES:
                            if verified:  # it changed since it was checked (restarted onto another version)
                                self.replica_set.reject(addr, str(exc))
                        else:
                            self.replica_set.failed(addr)
                        log.info("shard %s replica %s failed (%s); %s", shard, addr, exc,
                                 "failing over" if i + 1 < len(order) else "no replica left")
                        if verified or exc.code not in MISMATCH_CODES:  # not: dropped by GetInfo
                            out.failovers += 1
                        i += 1
                    else:
                        break
            out.failed.update({r: last_error for r in pending})
        return out

    def _call(self, addr: str, pending: list[NodeRef], out: FetchResult, timeout: float,
              first_reply_s: float | None = None) -> None:
        """One FetchBlocks call; moves each verified block from `pending` to `out.blocks` as it completes.

        The call may stream for `timeout`; its first chunk must come within `first_reply_s`: a replica that
        accepted the connection but does not answer (one restarting on its port, a hung process) is given
        up then, while one that streams a large block slowly is not cut off."""
        request = pb.FetchBlocksRequest(bank_id=self.bank_id,
                                        nodes=[pb.NodeRef(level=r.level, index=r.index) for r in pending])
        raw: torch.Tensor | None = None  # the block being received, as uint8
        buf: memoryview | None = None  # a writable view of `raw`
        got = crc = 0
        call = self.replica_set.channel(addr).fetch(request, timeout=max(0.01, timeout))
        replied = threading.Event()
        silent = threading.Event()
        watchdog = None
        if first_reply_s is not None and first_reply_s < timeout:

            def give_up() -> None:
                if not replied.is_set():
                    silent.set()
                    call.cancel()

            watchdog = threading.Timer(max(0.01, first_reply_s), give_up)
            watchdog.daemon = True
            watchdog.start()
        try:
            for chunk in call:
                replied.set()
                if chunk.header is not None:
                    if buf is not None:
                        raise AttemptFailed(grpc.StatusCode.DATA_LOSS, "block header before previous block ended")
                    self._check_header(chunk.header, pending[0] if pending else None)
                    # torch.empty maps fresh pages lazily; bytearray(n) would zero-fill them first (~1 ms/MB)
                    raw = torch.empty(chunk.header.nbytes, dtype=torch.uint8)
                    buf, got, crc = raw.numpy().data, 0, 0  # a writable memoryview of raw's bytes
                if raw is None or buf is None or chunk.offset != got or got + len(chunk.data) > len(buf):
                    raise AttemptFailed(grpc.StatusCode.DATA_LOSS, "chunk out of order")
                end = got + len(chunk.data)
                buf[got:end] = chunk.data
                crc = crc32c.crc32c(buf[got:end], crc)  # while the chunk is still in the CPU cache
                got = end
                if got == len(buf):
                    ref = pending[0]
                    self._finish_block(ref, raw, crc, out)
                    pending.pop(0)
                    raw = buf = None
        except grpc.RpcError as exc:
            if silent.is_set():
                raise AttemptFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no reply within {first_reply_s:.2f}s") from None
            code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            raise AttemptFailed(code, details or "") from None
        finally:
            replied.set()
            if watchdog is not None:
                watchdog.cancel()
            if call.is_active():  # we gave up on this replica mid-stream: stop it sending
                call.cancel()
        if buf is not None or pending:
            raise AttemptFailed(grpc.StatusCode.DATA_LOSS, f"stream ended with {len(pending)} blocks missing")

    def _check_header(self, header: pb.BlockHeader, expected: NodeRef | None) -> None:
        ref = NodeRef(header.node.level, header.node.index)
        if ref != expected:
            raise AttemptFailed(grpc.StatusCode.DATA_LOSS, f"got block {ref}, expected {expected}")
        if header.bank_id != self.bank_id:
            raise AttemptFailed(grpc.StatusCode.DATA_LOSS, f"block {ref} is from bank {header.bank_id}")
        info = self.bank.block_info(ref)
        if (tuple(header.shape) != tuple(info.shape) or header.dtype != info.dtype
                or header.nbytes != info.nbytes or header.crc32c != info.crc32c):
            raise AttemptFailed(grpc.StatusCode.DATA_LOSS, f"block {ref}: header disagrees with the manifest")

    def _finish_block(self, ref: NodeRef, raw: torch.Tensor, actual: int, out: FetchResult) -> None:
        info = self.bank.block_info(ref)
        if actual != info.crc32c:
            raise AttemptFailed(grpc.StatusCode.DATA_LOSS,
                                 f"block {ref}: crc32c {actual:#010x} != manifest {info.crc32c:#010x}")
        # as stored: an int8 block stays packed (rows with their scales; memory_store/quant.py) until the
        # model server dequantizes it into its slot pools, so its cache holds the smaller bytes
        out.blocks[ref] = raw.view(self._torch_dtype).view(self.bank.spec.stored_shape(info.shape))
        out.nbytes += raw.numel()
