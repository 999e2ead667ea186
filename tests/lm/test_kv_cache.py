"""KV cache with slots: incremental decoding equals full recomputation, rows at different lengths."""

from __future__ import annotations

import pytest
import torch

from lm.errors import CacheFull
from lm.kv_cache import KVCache
from lm.memory_batch import MemoryBatch
from tests.lm.conftest import random_block, rel_err


def _memories(d):
    blocks = [random_block(3, r, d, seed=20 + i) for i, r in enumerate((8, 4, 4, 2))]
    return blocks, {"A": [0, 1], "B": [0, 2, 3], "C": [], "D": [2]}


def test_single_row_decode_equals_recomputation(model):
    ids = torch.randint(0, 128, (1, 12))
    cache = KVCache(model.config, max_batch=2, max_seq_len=32)
    s = cache.allocate()
    with torch.no_grad():
        full = model(ids)
        step = [model(ids[:, :5], cache=cache, slots=[s])]
        for t in range(5, 12):
            step.append(model(ids[:, t:t + 1], cache=cache, slots=[s]))
    assert cache.length(s) == 12
    assert rel_err(torch.cat(step, dim=1), full) <= 1e-5


def test_batched_decode_rows_at_different_lengths_with_memories_and_a_join(model):
    """Rows with different prompt lengths and different memories decode together; a row joins mid-way
    into a slot freed by a row that left; every logit equals recomputing that row from scratch."""
    d = model.config.d_model
    blocks, paths = _memories(d)
    torch.manual_seed(1)
    seqs = {name: torch.randint(0, 128, (n,)).tolist() for name, n in (("A", 7), ("B", 3), ("C", 5), ("D", 4))}
    cache = KVCache(model.config, max_batch=3, max_seq_len=40)
    slot_of: dict[str, int] = {}
    last: dict[str, torch.Tensor] = {}

    def mem(names):
        return MemoryBatch.build(blocks, [paths[n] for n in names], [0, 1, 2])

    def reference(name):
        return model(torch.tensor([seqs[name]]), memory=mem([name]))[0, -1]

    with torch.no_grad():
        for name in ("A", "B", "C"):  # prefill one by one into free slots
            slot_of[name] = cache.allocate()
            last[name] = model(torch.tensor([seqs[name]]), cache=cache, slots=[slot_of[name]],
                               memory=mem([name]), last_only=True)[0, -1]
        with pytest.raises(CacheFull):
            cache.allocate()
        active = ["A", "B", "C"]
        for step in range(6):
            if step == 2:  # B leaves, D joins into its slot
                cache.free(slot_of.pop("B"))
                active.remove("B")
                slot_of["D"] = cache.allocate()
                last["D"] = model(torch.tensor([seqs["D"]]), cache=cache, slots=[slot_of["D"]],
                                  memory=mem(["D"]), last_only=True)[0, -1]
                active.append("D")
            for n in active:
                assert rel_err(last[n], reference(n)) <= 1e-5, (step, n)
                seqs[n].append(int(last[n].argmax()))
            logits = model(torch.tensor([[seqs[n][-1]] for n in active]), cache=cache,
                           slots=[slot_of[n] for n in active], memory=mem(active))
            last = {n: logits[i, -1] for i, n in enumerate(active)}
        for n in active:
            assert cache.length(slot_of[n]) == len(seqs[n])
            assert rel_err(last[n], reference(n)) <= 1e-5


def test_non_contiguous_slots_and_freeing(model):
    cache = KVCache(model.config, max_batch=4, max_seq_len=16)
    slots = [cache.allocate() for _ in range(4)]
    assert slots == [0, 1, 2, 3]
    cache.free(1)
    assert cache.active_slots == [0, 2, 3] and cache.n_free == 1
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        out = model(ids[:, :4], cache=cache, slots=[3, 0])
        nxt = model(ids[:, 4:6], cache=cache, slots=[3, 0])
    assert rel_err(torch.cat([out, nxt], 1), model(ids)) <= 1e-5
    with pytest.raises(ValueError):
        cache.free(1)  # already free
    with pytest.raises(ValueError):
        model(ids[:, :1], cache=cache, slots=[1])  # not allocated
    with pytest.raises(ValueError):
        model(torch.zeros(1, 20, dtype=torch.long), cache=cache, slots=[2])  # longer than the cache


def test_right_padded_prefill_of_several_prompts_equals_one_at_a_time(model):
    """Prompts of different lengths prefilled in one forward, right-padded, with `lengths=`: each row's logits
    at its last real token, its slot's length and the decode steps after it equal prefilling it alone."""
    d = model.config.d_model
    blocks, paths = _memories(d)
    torch.manual_seed(3)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (6, 2, 4)]
    names = ["A", "B", "C"]
    mem = MemoryBatch.build(blocks, [paths[n] for n in names], [0, 1, 2])
    ids = torch.zeros(3, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        cache = KVCache(model.config, max_batch=3, max_seq_len=16)
        slots = [cache.allocate() for _ in prompts]
        last = model(ids, cache=cache, slots=slots, memory=mem, last_only=True, lengths=torch.tensor([6, 2, 4]))
        assert [cache.length(s) for s in slots] == [6, 2, 4]
        nxt = torch.tensor([[7], [8], [9]])
        step = model(nxt, cache=cache, slots=slots, memory=mem)
        for b, (p, name) in enumerate(zip(prompts, names, strict=True)):
            one = MemoryBatch.build(blocks, [paths[name]], [0, 1, 2])
            want = model(torch.tensor([p + [int(nxt[b])]]), memory=one)[0]
            assert rel_err(last[b, 0], want[-2]) <= 1e-5
            assert rel_err(step[b, 0], want[-1]) <= 1e-5
        with pytest.raises(ValueError, match="lengths"):
            model(ids, last_only=True, lengths=torch.tensor([6, 0, 4]))
