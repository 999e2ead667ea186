import numpy as np
import pytest

from memory_store import Tree, build_tree
from memory_store.tree import normalize, random_tree


def skewed(n=4000, dim=24, seed=0):
    """70% of the points in one tight blob, the rest spread over 7 others."""
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((8, dim)))
    label = np.where(rng.random(n) < 0.7, 0, rng.integers(1, 8, n))
    return centers[label] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)


def test_balancing_holds_on_skewed_data():
    x = skewed()
    k = 4
    plain = build_tree(x, [k], seed=0, balance=1e9)  # balancing off
    balanced = build_tree(x, [k, 4], seed=0)
    frac_plain = np.bincount(plain.assignments[:, 0], minlength=k).max() / len(x)
    frac = np.bincount(balanced.assignments[:, 0], minlength=k).max() / len(x)
    assert frac_plain > 1.5 / k  # the data really is skewed for plain k-means
    assert frac <= 1.5 / k + 0.02
    # and at level 2, inside every level-1 node
    a = balanced.assignments
    for parent in range(k):
        kids = a[a[:, 0] == parent, 1]
        if len(kids) >= 40:
            assert np.bincount(kids).max() / len(kids) <= 1.5 / 4 + 0.05


def test_training_points_route_to_their_assigned_leaf_in_any_batch():
    x = skewed(n=1500)
    tree = build_tree(x, [3, 4], seed=1)
    assert tree.assignments.shape == (1500, 2)
    assert np.array_equal(tree.route(x), tree.assignments)
    for i in range(0, 1500, 97):  # batch of one, as the model server routes
        assert np.array_equal(tree.route(x[i:i + 1])[0], tree.assignments[i])
    # every level-2 index is a child of the level-1 index on the same path
    assert np.array_equal(tree.assignments[:, 1] // 4, tree.assignments[:, 0])


def test_routing_and_building_are_deterministic(tmp_path):
    x = skewed(n=800)
    t1, t2 = build_tree(x, [4, 2], seed=3), build_tree(x, [4, 2], seed=3)
    for a, b in zip(t1.centroids, t2.centroids, strict=True):
        np.testing.assert_array_equal(a, b)
    q = np.random.default_rng(9).standard_normal((50, x.shape[1])).astype(np.float32)
    assert np.array_equal(t1.route(q), t1.route(q))
    t1.save(tmp_path / "tree.safetensors")
    loaded = Tree.load(tmp_path / "tree.safetensors")
    assert np.array_equal(loaded.route(q), t1.route(q))
    assert loaded.branching == [4, 2] and loaded.assignments is None


def test_nodes_with_fewer_points_than_children_keep_the_tree_full():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)  # 5 points, 8 children at level 2 per node
    tree = build_tree(x, [2, 8], seed=0)
    assert [len(c) for c in tree.centroids] == [2, 16]
    assert all(np.isfinite(c).all() for c in tree.centroids)
    assert np.array_equal(tree.route(x), tree.assignments)
    assert len(np.unique(tree.assignments[:, 1])) == 5  # each point has a leaf of its own


def test_route_shapes_ancestors_and_bad_input():
    tree = random_tree([2, 3, 2], 8, seed=0)
    paths = tree.route(np.ones((4, 8), dtype=np.float32))
    assert paths.shape == (4, 3) and paths.dtype == np.int64
    assert tree.ancestor(3, 11, 1) == 11 // 6 and tree.ancestor(3, 11, 2) == 11 // 2
    assert list(tree.descendants((1, 1), 3)) == list(range(6, 12))
    with pytest.raises(Exception, match="dim"):
        tree.route(np.ones((1, 7), dtype=np.float32))


def test_route_restricted_to_allowed_level1_subtrees():
    tree = random_tree([4, 3], 8, seed=2)
    q = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    free = tree.route(q)
    limited = tree.route(q, allowed_level1={1, 3})
    assert set(limited[:, 0].tolist()) <= {1, 3}
    keep = np.isin(free[:, 0], [1, 3])
    assert np.array_equal(limited[keep], free[keep])  # rows that were allowed anyway are unchanged
    assert np.array_equal(limited[:, 1] // 3, limited[:, 0])
    with pytest.raises(Exception, match="empty"):
        tree.route(q, allowed_level1=[])


def test_large_nodes_train_on_a_sample_and_still_assign_every_point():
    x = skewed(n=3000)
    tree = build_tree(x, [4, 2], seed=0, max_points_per_centroid=8)  # trains on at most 32 points per node
    assert np.array_equal(tree.route(x), tree.assignments)
    assert np.bincount(tree.assignments[:, 0], minlength=4).max() / len(x) <= 1.5 / 4 + 0.02
    assert len(np.unique(tree.assignments[:, 1])) == 8
