from __future__ import annotations

from services.memory_bank.cache import HotCache


def test_lru_stays_within_its_byte_bound():
    cache = HotCache(max_bytes=100, max_level=1)
    assert cache.cacheable(1, 40) and not cache.cacheable(2, 40) and not cache.cacheable(1, 101)
    cache.put("a", b"x" * 40)
    cache.put("b", b"y" * 40)
    assert cache.get("a", 1) == b"x" * 40  # a is now the most recent
    cache.put("c", b"z" * 40)  # evicts b, the least recent
    assert cache.get("b", 1) is None and cache.get("a", 1) is not None and cache.get("c", 1) is not None
    assert cache.nbytes == 80 <= cache.max_bytes and len(cache) == 2


def test_disabled_cache_holds_nothing():
    cache = HotCache(max_bytes=0, max_level=3)
    assert not cache.cacheable(1, 1)
