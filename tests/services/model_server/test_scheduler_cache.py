"""Subtree-aware vs FIFO admission, aging; block cache LRU, pinning, single-flight, per-shard groups."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from memory_store import NodeRef
from services.model_server.block_cache import BlockCache
from services.model_server.metrics import Metrics
from services.model_server.scheduler import Scheduler

from .fakes import FakeFetcher


@dataclass
class W:
    name: str
    enqueued_at: float
    block_bytes: dict = field(default_factory=dict)
    skipped: int = 0


def test_subtree_scheduler_prefers_sharing_fifo_does_not():
    running = {("L1", 0), ("L2", 0)}
    waiting = [W("far", 0.0, {("L1", 1): 100, ("L2", 5): 10}),
               W("sibling", 0.1, {("L1", 0): 100, ("L2", 1): 10}),
               W("same", 0.2, {("L1", 0): 100, ("L2", 0): 10})]
    picked = Scheduler("subtree", 10).pick(waiting, running, 2, now=1.0)
    assert [w.name for w in picked] == ["same", "sibling"]
    assert [w.name for w in Scheduler("fifo").pick(waiting, running, 2, now=1.0)] == ["far", "sibling"]
    # aging: once "far" waited past the bound it goes first
    assert Scheduler("subtree", 0.5).pick(waiting, running, 1, now=1.0)[0].name == "far"


def test_subtree_scheduler_skip_bound_holds_under_load():
    """However long everyone waits, a request passed over max_skips times goes next."""
    sched = Scheduler("subtree", max_wait_s=1e9, max_skips=2)
    far = W("far", 0.0, {("L1", 9): 100})
    admitted = []
    for t in range(1, 6):
        waiting = [far, W(f"near{t}", float(t), {("L1", 0): 100})]
        pick = sched.pick([w for w in waiting if w.name not in admitted], {("L1", 0)}, 1, now=100.0)[0]
        admitted.append(pick.name)
        if pick is far:
            break
    assert admitted == ["near1", "near2", "far"] and far.skipped == 2


def test_subtree_scheduler_breaks_ties_by_affinity_with_the_queue():
    waiting = [W("loner", 0.0, {"A": 10, "X": 1}), W("popular", 0.1, {"A": 10, "Y": 1}),
               W("b1", 0.2, {"Y": 1}), W("b2", 0.3, {"Y": 1})]
    assert Scheduler("subtree", 10).pick(waiting, {"A"}, 1, now=1.0)[0].name == "popular"


def test_subtree_scheduler_groups_when_batch_is_empty():
    waiting = [W("a0", 0.0, {"A": 1}), W("b0", 0.1, {"B": 1}), W("a1", 0.2, {"A": 1})]
    assert [w.name for w in Scheduler("subtree", 10).pick(waiting, set(), 2, now=0.3)] == ["a0", "a1"]


def test_subtree_scheduler_relative_wait_bound():
    """A request waiting wait_factor x the recent mean wait goes first, however much others share."""
    sched = Scheduler("subtree", max_wait_s=1e9, max_skips=99, wait_factor=2.0)
    sched.pick([W("warm", 0.0, {"A": 1})], set(), 1, now=1.0)  # mean wait 1.0 s
    assert sched.mean_wait == 1.0
    far = W("far", 0.5, {"Z": 100})
    near = W("near", 1.0, {"A": 100})
    assert sched.pick([far, near], {"A"}, 1, now=2.0)[0] is near  # far waited 1.5 s < 2 x mean
    assert sched.pick([far, W("near2", 2.0, {"A": 100})], {"A"}, 1, now=2.6)[0] is far  # 2.1 s >= 2 x ~1.05
    # without the relative bound the sharing request would still win
    plain = Scheduler("subtree", max_wait_s=1e9, max_skips=99)
    assert plain.pick([W("far", 0.5, {"Z": 100}), W("n", 2.0, {"A": 100})], {"A"}, 1, now=2.6)[0].name == "n"


def test_admit_group_only_for_subtree_and_a_running_batch():
    sub, fifo = Scheduler("subtree", admit_group=2), Scheduler("fifo", admit_group=2)
    assert sub.min_admit(5, batch_running=True, max_rows=8) == 2
    assert sub.min_admit(1, batch_running=True, max_rows=8) == 1  # a lone request is not held
    assert sub.min_admit(5, batch_running=False, max_rows=8) == 1  # an idle engine admits at once
    assert sub.min_admit(5, batch_running=True, max_rows=1) == 1
    assert fifo.min_admit(5, batch_running=True, max_rows=8) == 1


def _block_bytes():
    return torch.full((1, 3, 2, 4), 1.0).numel() * 4  # float32 in the cache


def test_lru_is_byte_bounded_and_pinned_levels_stay():
    fetcher = FakeFetcher()
    metrics = Metrics()
    cache = BlockCache(fetcher, capacity_bytes=2 * _block_bytes(), pinned_levels=1, metrics=metrics)
    cache.preload([NodeRef(1, i) for i in range(4)])
    refs = [NodeRef(2, i) for i in range(3)]
    for r in refs:
        got = cache.get_many([r])
        assert got.blocks[r].dtype == torch.float32 and got.misses == 1
    assert cache.lru_bytes == 2 * _block_bytes()
    assert refs[0] not in cache and refs[2] in cache and NodeRef(1, 3) in cache
    got = cache.get_many([NodeRef(1, 2), refs[2]])
    assert got.hits == 2 and got.misses == 0
    assert cache.stats()["bytes_per_level"] == {1: 4 * _block_bytes(), 2: 2 * _block_bytes()}
    text = metrics.registry.get_sample_value("hiermem_block_cache_hits_total", {"level": "1"})
    assert text == 1.0


def test_concurrent_requests_share_one_fetch_and_group_per_shard():
    fetcher = FakeFetcher(delay=0.2)
    cache = BlockCache(fetcher, capacity_bytes=1 << 20, shard_of=fetcher.bank.shard_of)
    path = [NodeRef(1, 2), NodeRef(2, 4)]
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_many(path))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetcher.calls) == 1 and sorted(fetcher.calls[0]) == sorted(path)
    assert all(set(r.blocks) == set(path) for r in results)
    fetcher.delay = 0
    cache.get_many([NodeRef(1, 0), NodeRef(1, 1), NodeRef(2, 2)])  # shard s0, s1, s1
    assert sorted(len(c) for c in fetcher.calls[1:]) == [1, 2]


def test_failed_fetch_is_reported_and_retried_later():
    fetcher = FakeFetcher()
    fetcher.down.add("s1")
    cache = BlockCache(fetcher, capacity_bytes=1 << 20, shard_of=fetcher.bank.shard_of)
    got = cache.get_many([NodeRef(1, 1)])
    assert NodeRef(1, 1) in got.failed and not got.blocks
    fetcher.down.clear()
    assert NodeRef(1, 1) in cache.get_many([NodeRef(1, 1)]).blocks


def test_an_int8_banks_blocks_stay_packed_in_the_cache_and_come_out_dequantized(tmp_path):
    from memory_store import Bank
    from services.model_server.components import LocalFetcher
    from tests.integration.procs import build_test_bank

    bank = Bank.open(build_test_bank(tmp_path / "q", dtype="int8"))
    cache = BlockCache(LocalFetcher(bank), capacity_bytes=1 << 20, shard_of=bank.shard_of)
    path = [NodeRef(1, 2), NodeRef(2, 9), NodeRef(3, 37)]
    got = cache.get_many(path, count=False)
    for ref in path:
        assert got.blocks[ref].dtype == torch.float32 and torch.equal(got.blocks[ref], bank.read_block(ref))
    # the cache counts the stored bytes: d int8 values and a float32 scale per row, about a quarter of float32
    stored = sum(bank.block_info(r).nbytes for r in path)
    assert cache.lru_bytes == stored < sum(b.numel() * 4 for b in got.blocks.values()) / 3
    again = cache.get_many(path)
    assert again.hits == 3 and all(torch.equal(again.blocks[r], got.blocks[r]) for r in path)
    bf16 = BlockCache(LocalFetcher(bank), capacity_bytes=1 << 20, dtype=torch.bfloat16)
    assert bf16.get_many(path[:1]).blocks[path[0]].dtype == torch.bfloat16
