"""A byte-bounded LRU of verified shallow-level blocks, so hot blocks skip the mapped file and its check."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from . import metrics


class HotCache:
    """LRU of block bytes for levels <= `max_level`, holding at most `max_bytes` (0 disables it).

    Used from the server's event loop only, so it needs no lock. Entries are immutable `bytes` copies
    made when a block was read and verified, so they stay valid whatever happens to the file."""

    def __init__(self, max_bytes: int, max_level: int) -> None:
        self.max_bytes = max_bytes
        self.max_level = max_level
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self.nbytes = 0

    def cacheable(self, level: int, nbytes: int) -> bool:
        return self.max_bytes > 0 and level <= self.max_level and nbytes <= self.max_bytes

    def get(self, key: Hashable, level: int) -> bytes | None:
        data = self._entries.get(key)
        if data is None:
            metrics.CACHE_MISSES.labels(str(level)).inc()
            return None
        self._entries.move_to_end(key)
        metrics.CACHE_HITS.labels(str(level)).inc()
        return data

    def peek(self, key: Hashable) -> bool:
        """Whether `key` is cached, without counting a hit or a miss."""
        return key in self._entries

    def put(self, key: Hashable, data: bytes) -> None:
        if key in self._entries or len(data) > self.max_bytes:
            return
        while self.nbytes + len(data) > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= len(old)
        self._entries[key] = data
        self.nbytes += len(data)
        metrics.CACHE_BYTES.set(self.nbytes)

    def __len__(self) -> int:
        return len(self._entries)
