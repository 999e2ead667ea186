from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from memory_store import Bank, NodeRef
from memory_store.layout import nodes_in_shard, split_subtrees
from memory_store.tree import random_tree

from .conftest import tiny_spec, write_bank


@settings(max_examples=60, deadline=None)
@given(branching=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_shards_partition_subtrees_and_hold_their_ancestors(branching, data):
    depth = len(branching)
    spec = tiny_spec(branching=branching, ranks=[1] * depth,
                     shard_level=data.draw(st.integers(1, depth)))
    n_sl = spec.nodes_at(spec.shard_level)
    cuts = split_subtrees(spec, data.draw(st.integers(1, n_sl)))
    assert cuts[0][0] == 0 and cuts[-1][1] == n_sl and all(a < b for a, b in cuts)
    tree = random_tree(branching, 4)
    for level in range(1, depth + 1):
        held = [set(nodes_in_shard(spec, cut, level)) for cut in cuts]
        if level >= spec.shard_level:  # each node in exactly one shard: the one owning its ancestor
            assert sum(len(h) for h in held) == spec.nodes_at(level)
            for sid, h in enumerate(held):
                for i in h:
                    a = tree.ancestor(level, i, spec.shard_level)
                    assert cuts[sid][0] <= a < cuts[sid][1]
        else:  # a node above the cut is in every shard owning one of its descendants
            for sid, cut in enumerate(cuts):
                want = {tree.ancestor(spec.shard_level, j, level) for j in range(*cut)}
                assert held[sid] == want


def test_concurrent_readers_with_page_releases_read_correct_blocks(tmp_path):
    spec = tiny_spec(branching=[4, 4], ranks=[32, 16], d_model=64)
    _, blocks, _ = write_bank(tmp_path / "b", spec, n_shards=2)
    bank = Bank.open(tmp_path / "b", mapped_budget_bytes=64 * 1024)  # releases every few blocks

    def read_all(seed):
        refs = sorted(blocks, key=lambda r: hash((seed, r)))
        return all((bank.read_block(r).numpy() == blocks[r]).all() for r in refs for _ in range(3))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read_all, range(8)))
    assert bank.read_block(NodeRef(2, 15)).shape == spec.block_shape(2)
