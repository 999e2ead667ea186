"""From a request's `memory` field to the blocks it is generated with: route, check access, fetch.

`MemoryResolver.resolve(spec, text, principal)` -> (RequestMemory, MemoryInfo): the blocks for the engine
(request_memory.py follows them on to the FFN) and what the response says about them.

Routing goes through the bank's nearest-document router and its gate when the bank has one
(memory_store.router, docs/training.md), else greedy descent (docs/design.md §1); both are restricted to
the level-1 subtrees the caller's key allows, so a key limited to subtree 3 never routes, and so never
fetches, outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import torch

from memory_store import NodeRef, Tree, path_refs
from memory_store.router import DocRouter

from .auth import Principal
from .block_cache import BlockCache
from .errors import Forbidden, InvalidRequest, MemoryUnavailable
from .metrics import Metrics
from .reasons import DELETED_REASON, GATED_REASON, NOT_ALLOWED_REASON
from .request_memory import NO_MEMORY, RequestMemory
from .schemas import MemoryInfo, MemoryMode, MemorySpec

log = logging.getLogger(__name__)

GENERIC: Final = "generic"


Embed = Callable[[list[str]], np.ndarray]
"""Texts -> their embeddings, one row each (the bank's embedder: memory_store.load_embedder)."""


class BankView(Protocol):
    """What the model server reads of a bank (a `memory_store.Bank`) besides its blocks: the tree it routes
    in, which nodes it has, where they are stored, its generic memory."""

    @property
    def bank_id(self) -> str: ...

    @property
    def dir(self) -> Path | None:
        """The bank's directory (its document router, if any, is stored there); None: no directory."""

    @property
    def tree(self) -> Tree: ...

    def present_prefix(self, path: Sequence[int]) -> list[int]:
        """The longest prefix of `path` whose nodes have blocks (a deleted subtree cuts it)."""

    def is_present(self, ref: NodeRef) -> bool: ...

    def shard_of(self, ref: NodeRef) -> str: ...

    def generic_block(self) -> torch.Tensor | None: ...


class MemoryResolver:
    """Turns a memory request into (RequestMemory, MemoryInfo). Thread-safe; called off the event loop."""

    def __init__(self, bank: BankView, cache: BlockCache, embed: Embed, *,
                 strict: bool = False, metrics: Metrics | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.bank = bank
        self.cache = cache
        self._embed = embed
        self.strict = strict
        self.metrics = metrics
        self._dtype = dtype
        self._tree = bank.tree  # routing is memory_store's: the scoring used offline too
        # A bank trained from documents carries a nearest-document router with a gate (memory_store.router):
        # prompts go to the path of the documents they match, or get no memory when they match none.
        self._router = DocRouter.load(bank.dir) if bank.dir is not None else None
        if self._router is not None:
            log.info("routing through %d trained documents (gate: min_idf %.2f, min_cos %.2f)",
                     self._router.n_docs, self._router.min_idf, self._router.min_cos)
        self._sizes = [len(c) for c in bank.tree.centroids]
        self._generic: torch.Tensor | None = None
        self._generic_lock = threading.Lock()
        self._embed_lock = threading.Lock()

    @property
    def depth(self) -> int:
        return len(self._sizes)

    def pinned_refs(self, levels: int) -> list[NodeRef]:
        return [NodeRef(lv, i) for lv in range(1, min(levels, self.depth) + 1) for i in range(self._sizes[lv - 1])]

    def _embed_locked(self, texts: list[str]) -> np.ndarray:
        with self._embed_lock:  # the embedder is not guaranteed thread-safe; routing itself needs no lock
            return self._embed(texts)

    def route(self, text: str, principal: Principal) -> tuple[list[int] | None, float, str | None]:
        """Path of `text` within the subtrees `principal` may use: (path or None, route_ms, reason)."""
        allowed = principal.subtrees
        if allowed is not None:
            allowed = frozenset(i for i in allowed if 0 <= i < self._sizes[0])
            if not allowed:
                if self.metrics is not None:
                    self.metrics.routed.labels(outcome="not_allowed").inc()
                return None, 0.0, NOT_ALLOWED_REASON
        t0 = time.perf_counter()
        reason = None
        path: list[int] | None
        if self._router is not None:  # the whole prompt and each of its sentences (DocRouter.query_texts)
            r = self._router.route_texts([text], self._embed_locked, allowed_level1=allowed)[0]
            path = list(r.path) if r.path is not None else None
            if path is None:
                reason = GATED_REASON
        else:
            emb = np.asarray(self._embed_locked([text]), dtype=np.float32)
            path = [int(i) for i in self._tree.route(emb[:1], allowed_level1=allowed)[0]]
        dt = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.route_latency.observe(dt)
            self.metrics.routed.labels(outcome="gated" if path is None else "memory").inc()
        return path, dt * 1000.0, reason

    def check_path(self, path: Sequence[int], principal: Principal) -> list[int]:
        """Validate an explicit path: one index per level (a prefix is allowed), each a child of the last."""
        if len(path) > self.depth:
            raise InvalidRequest(f"memory path has {len(path)} levels, the bank {self.depth}", param="memory")
        for lv, idx in enumerate(path, start=1):
            if idx >= self._sizes[lv - 1]:
                raise InvalidRequest(f"level {lv} has {self._sizes[lv - 1]} nodes, got index {idx}",
                                     param="memory")
            if lv > 1:
                if int(self._tree.parents[lv - 1][idx]) != path[lv - 2]:
                    raise InvalidRequest(f"node {lv}:{idx} is not a child of {lv - 1}:{path[lv - 2]}",
                                         param="memory")
        if not principal.allows(path[0]):
            raise Forbidden(f"this API key may not use memory subtree {path[0]}", param="memory")
        return list(path)

    def resolve(self, spec: MemorySpec, text: str, principal: Principal) -> tuple[RequestMemory, MemoryInfo]:
        """The memory of one request and what its response says about it; `text` is what "auto" routes."""
        if spec == "off":
            return NO_MEMORY, MemoryInfo(mode="off")
        if spec == GENERIC:
            block = self.generic_block()
            if block is None:
                raise InvalidRequest("this bank has no generic memory", param="memory", code="no_generic_memory")
            return (RequestMemory({(self.version_key, GENERIC): block}),
                    MemoryInfo(mode="generic", levels=list(range(1, self.depth + 1))))
        route_ms = 0.0
        mode: MemoryMode
        if spec == "auto":
            path, route_ms, reason = self.route(text, principal)
            if path is None:
                return NO_MEMORY, MemoryInfo(mode="auto", reason=reason)
            mode = "auto"
        else:
            path, mode = self.check_path(spec, principal), "path"
        return self._fetch_path(path, mode, route_ms)

    def _fetch_path(self, path: list[int], mode: MemoryMode, route_ms: float) -> tuple[RequestMemory, MemoryInfo]:
        # Deleted is not down: whatever produced the path (router or caller), it is cut at the deepest
        # level whose node the bank has; that request is served in full, not degraded, also in strict mode.
        present = self.bank.present_prefix(path)
        deleted = None if len(present) == len(path) else NodeRef(len(present) + 1, int(path[len(present)]))
        refs = path_refs(present)
        got = self.cache.get_many(refs)
        used = [r for r in refs if r in got.blocks]
        # Keys name blocks across the engine's batch: qualified by the bank version, so requests resolved
        # before and after a switch to a new version never share a block by node alone.
        memory = RequestMemory({(self.version_key, r): got.blocks[r] for r in used})
        info = MemoryInfo(mode=mode, path=present, levels=[r.level for r in used],
                          cache_hits=got.hits, cache_misses=got.misses, fetch_ms=round(got.fetch_ms, 3),
                          route_ms=round(route_ms, 3))
        if deleted is not None:  # a public text: nothing about the tree beyond the path the client sees
            info.reason = DELETED_REASON
            log.info("path %s: node %s was deleted from the bank, served with levels 1..%d", path, deleted,
                     len(present))
        if got.failed:
            lost = sorted(r.level for r in got.failed)
            first = got.failed[min(got.failed, key=lambda r: r.level)]
            info.degraded = True
            info.reason = f"levels {lost} unavailable: {first}"
            if self.metrics is not None:
                self.metrics.degraded.inc()
            log.warning("memory degraded: levels %s unavailable", lost)
            if self.strict:
                raise MemoryUnavailable(f"memory levels {lost} unavailable (strict mode)",
                                        headers={"Retry-After": "5"})
        return memory, info

    @property
    def version_key(self) -> str:
        """The bank version this resolver serves (its bank_id, shortened)."""
        return self.bank.bank_id[:16]

    def generic_block(self) -> torch.Tensor | None:
        with self._generic_lock:
            if self._generic is None:
                block = self.bank.generic_block()
                if block is None:
                    return None
                self._generic = block.to(self._dtype).contiguous()
            return self._generic
