"""Block cache: pinned shallow levels + a byte-bounded LRU, one in-flight fetch per node.

Blocks enter in the compute dtype (float32 on CPU); an int8 bank's blocks stay packed in the cache (about
half the bytes of a 16-bit block, memory_store/quant.py) and are dequantized when handed out. Misses are grouped per shard and each group is
fetched through the fetcher (the bank client), so a request costs at most one RPC per shard; concurrent
requests for a node that is being fetched wait for that fetch instead of starting another.

Threads only, like the bank client under it: the calling thread (the request's worker thread) fetches
the first shard group itself, and only when a request needs several shards are the others fetched at the
same time from a small pool. A path lies in one shard, so a request normally uses no other thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

import torch

from memory_store import NodeRef
from memory_store.quant import unpack_rows
from services.memory_bank.result import FetchResult

from .metrics import Metrics

log = logging.getLogger(__name__)


class Fetcher(Protocol):
    """Where the cache gets blocks: the bank client (services.memory_bank.client.BankClient), or the bank's
    own files (service.LocalFetcher). Every node asked for is in the result's `blocks` or `failed`."""

    def fetch(self, refs: Sequence[NodeRef]) -> FetchResult: ...


@dataclass
class CacheResult:
    """Outcome of one `get_many`: the blocks that could be had and why the others could not."""

    blocks: dict[NodeRef, torch.Tensor] = field(default_factory=dict)
    failed: dict[NodeRef, str] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    fetch_ms: float = 0.0


class BlockCache:
    """Pinned + LRU store of memory blocks keyed by NodeRef."""

    def __init__(self, fetcher: Fetcher, *, capacity_bytes: int, pinned_levels: int = 0,
                 shard_of: Callable[[NodeRef], str] | None = None,
                 subtree_of: Callable[[NodeRef], int] | None = None,
                 metrics: Metrics | None = None,
                 dtype: torch.dtype = torch.float32, timeout_s: float = 10.0) -> None:
        self._fetcher = fetcher
        self.capacity_bytes = capacity_bytes
        self.pinned_levels = pinned_levels
        self._shard_of = shard_of or (lambda ref: "bank")
        self._subtree_of = subtree_of
        self._metrics = metrics
        self._dtype = dtype
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pinned: dict[NodeRef, torch.Tensor] = {}
        self._lru: OrderedDict[NodeRef, torch.Tensor] = OrderedDict()
        self._lru_bytes = 0
        self._inflight: dict[NodeRef, Future] = {}
        self._bytes_per_level: dict[int, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="block-fetch")  # 2nd+ shards only

    # ---- queries -----------------------------------------------------------------------------
    def __contains__(self, ref: NodeRef) -> bool:
        with self._lock:
            return ref in self._pinned or ref in self._lru

    @property
    def lru_bytes(self) -> int:
        return self._lru_bytes

    def stats(self) -> dict[str, int | dict[int, int]]:
        with self._lock:
            return {"pinned_blocks": len(self._pinned), "lru_blocks": len(self._lru),
                    "lru_bytes": self._lru_bytes, "capacity_bytes": self.capacity_bytes,
                    "bytes_per_level": dict(self._bytes_per_level)}

    # ---- fetching ----------------------------------------------------------------------------
    def preload(self, refs: Iterable[NodeRef], *, deadline_s: float = 0.0, retry_wait_s: float = 0.5,
                max_wait_s: float = 5.0) -> dict[NodeRef, str]:
        """Fetch and pin `refs` (the shallow levels) at start-up; returns the ones still missing at the end.

        A block that fails (a fetch that timed out on a busy machine, a shard not up yet) is asked for again,
        after retry_wait_s doubling up to max_wait_s, until every block is pinned or `deadline_s` seconds have
        passed since the start (0 = one attempt). A fetch still running when its wait timed out is waited for
        again rather than started twice (one in-flight fetch per node). Each retry round is logged; what is
        still missing at the deadline is fetched on demand later."""
        refs = list(refs)
        t0 = time.monotonic()
        pending, failed = refs, {}
        wait, attempt = retry_wait_s, 0
        while pending:
            attempt += 1
            failed = self.get_many(pending, count=False).failed
            left = deadline_s - (time.monotonic() - t0)
            if not failed or left <= 0:
                break
            reasons = sorted(set(failed.values()))
            log.info("preload: %d of %d blocks not pinned yet after attempt %d (%s); retrying in %.1fs "
                     "(%.0fs left of the %.0fs deadline)", len(failed), len(refs), attempt,
                     "; ".join(reasons[:3]), min(wait, left), left, deadline_s)
            time.sleep(min(wait, left))
            wait = min(2 * wait, max_wait_s)
            pending = list(failed)
        took = time.monotonic() - t0
        if failed:
            log.warning("preload: %d of %d blocks unavailable after %d attempt(s) in %.1fs; they will be fetched "
                        "on demand", len(failed), len(refs), attempt, took)
        elif attempt > 1:
            log.info("preload: all %d blocks pinned after %d attempts in %.1fs", len(refs), attempt, took)
        return failed

    def get_many(self, refs: Sequence[NodeRef], *, count: bool = True) -> CacheResult:
        """Blocks for `refs` (compute dtype), from the cache or one shared fetch per missing node."""
        out = CacheResult()
        owned: list[NodeRef] = []
        waits: dict[NodeRef, Future] = {}
        with self._lock:
            for ref in refs:
                block = self._pinned.get(ref)
                if block is None:
                    block = self._lru.get(ref)
                    if block is not None:
                        self._lru.move_to_end(ref)
                if block is not None:
                    out.blocks[ref] = block
                    out.hits += 1
                    self._count(ref, hit=True, enabled=count)
                    continue
                out.misses += 1
                self._count(ref, hit=False, enabled=count)
                fut = self._inflight.get(ref)
                if fut is None:
                    fut = Future()
                    self._inflight[ref] = fut
                    owned.append(ref)
                waits[ref] = fut
        if not waits:
            return self._unpacked(out)
        t0 = time.perf_counter()
        if owned:
            self._fetch_owned(owned)
        deadline = time.monotonic() + self._timeout_s
        for ref, fut in waits.items():
            try:
                out.blocks[ref] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                out.failed[ref] = "fetch timed out"
            except Exception as exc:  # the reason travels to the response's memory object
                out.failed[ref] = str(exc) or type(exc).__name__
        out.fetch_ms = (time.perf_counter() - t0) * 1000.0
        return self._unpacked(out)

    def _unpacked(self, out: CacheResult) -> CacheResult:
        """Packed int8 blocks (memory_store/quant.py) dequantized to the compute dtype; others as they are."""
        for ref, block in out.blocks.items():
            if block.dtype == torch.int8:
                out.blocks[ref] = unpack_rows(block, self._dtype)
        return out

    def _fetch_owned(self, owned: list[NodeRef]) -> None:
        groups: dict[str, list[NodeRef]] = {}
        for ref in owned:
            groups.setdefault(self._shard_of(ref), []).append(ref)
        items = list(groups.items())
        futures = {shard: self._pool.submit(self._fetch_group, shard, group) for shard, group in items[1:]}
        first_shard, first_group = items[0]
        try:
            self._fetch_group(first_shard, first_group)  # in this thread
        except Exception as exc:  # never leave a waiter hanging
            log.warning("fetch from shard %s failed: %s", first_shard, exc)
            self._resolve_failed(first_group, f"shard {first_shard}: {exc}")
        for shard, fut in futures.items():
            try:
                fut.result()
            except Exception as exc:  # never leave a waiter hanging
                log.warning("fetch from shard %s failed: %s", shard, exc)
                self._resolve_failed(groups[shard], f"shard {shard}: {exc}")

    def _fetch_group(self, shard: str, refs: list[NodeRef]) -> None:
        t0 = time.perf_counter()
        try:
            result = self._fetcher.fetch(refs)
            blocks, failed = dict(result.blocks), dict(result.failed)
        except Exception as exc:
            blocks, failed = {}, {ref: f"shard {shard}: {exc}" for ref in refs}
        if self._metrics is not None:
            self._metrics.fetch_latency.labels(shard=shard).observe(time.perf_counter() - t0)
            for ref in refs:
                subtree = str(self._subtree_of(ref)) if self._subtree_of is not None else "?"
                self._metrics.fetched_blocks.labels(shard=shard, subtree=subtree).inc()
            if failed:
                self._metrics.fetch_failures.labels(shard=shard).inc(len(failed))
        for ref in refs:
            block = blocks.get(ref)
            if block is None:
                self._resolve_failed([ref], failed.get(ref, f"shard {shard}: block not returned"))
                continue
            # an int8 block is kept packed (its bytes, about half a 16-bit block's) and dequantized when handed out
            block = block.contiguous() if block.dtype == torch.int8 else block.to(self._dtype).contiguous()
            with self._lock:
                self._insert(ref, block)
                fut = self._inflight.pop(ref, None)
            if fut is not None:
                fut.set_result(block)

    def _resolve_failed(self, refs: list[NodeRef], reason: str) -> None:
        for ref in refs:
            with self._lock:
                fut = self._inflight.pop(ref, None)
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError(reason))

    # ---- storage (lock held) -----------------------------------------------------------------
    def _insert(self, ref: NodeRef, block: torch.Tensor) -> None:
        nbytes = block.numel() * block.element_size()
        level = ref.level
        if level <= self.pinned_levels:
            if ref not in self._pinned:
                self._pinned[ref] = block
                self._add_bytes(level, nbytes)
            return
        if ref in self._lru or nbytes > self.capacity_bytes:
            return
        self._lru[ref] = block
        self._lru_bytes += nbytes
        self._add_bytes(level, nbytes)
        while self._lru_bytes > self.capacity_bytes and self._lru:
            old_ref, old = self._lru.popitem(last=False)
            old_bytes = old.numel() * old.element_size()
            self._lru_bytes -= old_bytes
            self._add_bytes(old_ref.level, -old_bytes)

    def _add_bytes(self, level: int, delta: int) -> None:
        self._bytes_per_level[level] = self._bytes_per_level.get(level, 0) + delta
        if self._metrics is not None:
            self._metrics.cache_bytes.labels(level=str(level)).set(self._bytes_per_level[level])

    def _count(self, ref: NodeRef, *, hit: bool, enabled: bool) -> None:
        if not enabled or self._metrics is None:
            return
        level = str(ref.level)
        (self._metrics.cache_hits if hit else self._metrics.cache_misses).labels(level=level).inc()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
