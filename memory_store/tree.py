"""The cluster tree: hierarchical k-means from the root down (faiss), and greedy-descent routing.

Every level l holds exactly prod(branching[:l]) nodes, so a tree always matches its BankSpec. Routing and
the assignment of training points use one scoring function, `_nearest_child`, which computes each row's
scores independently of the batch it comes in (numpy einsum, not BLAS), so a training point routes to the
leaf it was assigned, whatever the batch size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from memory_store.errors import BankError
from memory_store.spec import NodeRef, path_refs

log = logging.getLogger(__name__)

_ROUTE_CHUNK = 4096
_SMALL_KMEANS = 20_000  # points below which faiss runs single-threaded


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _nearest_child(emb: np.ndarray, parent_idx: np.ndarray, centroids: np.ndarray, k: int,
                   mask: np.ndarray | None = None) -> np.ndarray:
    """For each row, the index (within the level) of the most similar of its parent's k children.

    Semantics:
        for n in rows: kids = parent_idx[n]*k + arange(k)
                       out[n] = kids[argmax(centroids[kids] @ emb[n])]
    """
    out = np.empty(len(emb), dtype=np.int64)
    offsets = np.arange(k, dtype=np.int64)
    for s in range(0, len(emb), _ROUTE_CHUNK):
        e = emb[s:s + _ROUTE_CHUNK]
        kids = parent_idx[s:s + _ROUTE_CHUNK, None] * k + offsets  # (n, k)
        scores = np.einsum("nd,nkd->nk", e, centroids[kids])  # (n, k), per row, batch-independent
        if mask is not None:
            scores[~mask[kids]] = -np.inf
        out[s:s + _ROUTE_CHUNK] = kids[np.arange(len(e)), np.argmax(scores, axis=1)]
    return out


@dataclass
class Tree:
    """Centroids per level (`[n_l, dim]` float32, unit norm) and parent indices (`[n_l]` int64).

    Children of node i at level l-1 are the indices i*k_l .. i*k_l + k_l - 1 at level l, so
    `parents[l-1][j] == j // k_l`; the arrays are stored anyway so the file says it explicitly.
    """

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    assignments: np.ndarray | None = field(default=None, repr=False)
    """`[N, depth]` int64: the path of every training point (set by build_tree; None after load)."""

    def __post_init__(self) -> None:
        if len(self.centroids) != len(self.parents) or not self.centroids:
            raise BankError("a tree needs one centroid array and one parent array per level")
        self.centroids = [np.ascontiguousarray(c, dtype=np.float32) for c in self.centroids]
        self.parents = [np.ascontiguousarray(p, dtype=np.int64) for p in self.parents]
        prev = 1
        for level, (c, p) in enumerate(zip(self.centroids, self.parents, strict=True), start=1):
            if c.ndim != 2 or len(c) != len(p) or len(c) % prev:
                raise BankError(f"level {level}: {len(c)} centroids do not split evenly over {prev} parents")
            k = len(c) // prev
            if not np.array_equal(p, np.arange(len(c)) // k):
                raise BankError(f"level {level}: parent indices are not the k-ary layout i // {k}")
            prev = len(c)

    @property
    def depth(self) -> int:
        return len(self.centroids)

    @property
    def dim(self) -> int:
        return self.centroids[0].shape[1]

    @property
    def branching(self) -> list[int]:
        sizes = [1] + [len(c) for c in self.centroids]
        return [b // a for a, b in zip(sizes, sizes[1:], strict=False)]

    def route(self, emb: np.ndarray, allowed_level1=None) -> np.ndarray:
        """Greedy descent: `emb [N, dim]` (normalised here) -> paths `int64 [N, depth]`.

        `allowed_level1`: level-1 indices the descent may enter (access control); None = all."""
        emb = normalize(np.atleast_2d(emb))
        if emb.shape[1] != self.dim:
            raise BankError(f"embeddings have dim {emb.shape[1]}, the tree {self.dim}")
        mask = None
        if allowed_level1 is not None:
            mask = np.zeros(len(self.centroids[0]), dtype=bool)
            mask[np.asarray(sorted(allowed_level1), dtype=np.int64)] = True
            if not mask.any():
                raise BankError("allowed_level1 is empty: no subtree to route into")
        paths = np.empty((len(emb), self.depth), dtype=np.int64)
        node = np.zeros(len(emb), dtype=np.int64)
        for level, k in enumerate(self.branching):
            node = _nearest_child(emb, node, self.centroids[level], k, mask if level == 0 else None)
            paths[:, level] = node
        return paths

    path_refs = staticmethod(path_refs)

    def ancestor(self, level: int, index: int, at_level: int) -> int:
        """Index of the ancestor at `at_level` (<= level) of node (level, index)."""
        if not 1 <= at_level <= level <= self.depth:
            raise BankError(f"need 1 <= at_level ({at_level}) <= level ({level}) <= depth ({self.depth})")
        for lv in range(level, at_level, -1):
            index = int(self.parents[lv - 1][index])
        return index

    def descendants(self, ref: NodeRef, level: int) -> range:
        """Indices at `level` (>= ref.level) of the subtree rooted at `ref` (contiguous by layout)."""
        ref_level, ref_index = int(ref[0]), int(ref[1])
        span = math.prod(self.branching[ref_level:level])
        return range(ref_index * span, (ref_index + 1) * span)

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for level, (c, p) in enumerate(zip(self.centroids, self.parents, strict=True), start=1):
            tensors[f"centroids.{level}"] = c
            tensors[f"parents.{level}"] = p
        save_file(tensors, str(path), metadata={"format": "hiermem-tree/1", "depth": str(self.depth)})

    @classmethod
    def load(cls, path: str | Path) -> Tree:
        from safetensors.numpy import load_file

        t = load_file(str(path))
        depth = sum(1 for key in t if key.startswith("centroids."))
        return cls([t[f"centroids.{lv}"] for lv in range(1, depth + 1)],
                   [t[f"parents.{lv}"] for lv in range(1, depth + 1)])


def random_tree(branching: list[int], dim: int, seed: int = 0, spread: float = 0.5) -> Tree:
    """A tree of random unit centroids, each child near its parent (for synthetic banks)."""
    rng = np.random.default_rng(seed)
    centroids: list[np.ndarray] = []
    parents: list[np.ndarray] = []
    prev = np.zeros((1, dim), dtype=np.float32)
    for k in branching:
        par = np.repeat(np.arange(len(prev)), k)
        noise = normalize(rng.standard_normal((len(par), dim), dtype=np.float32))
        c = normalize(prev[par] + spread * noise) if centroids else noise
        centroids.append(c)
        parents.append(par)
        prev = c
    return Tree(centroids, parents)


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int, max_points_per_centroid: int) -> np.ndarray:
    """k spherical centroids of x (len(x) >= k), trained on a seeded sample of at most mppc*k rows."""
    import faiss

    rng = np.random.default_rng(seed)
    if len(x) > max_points_per_centroid * k:
        x = x[np.sort(rng.choice(len(x), max_points_per_centroid * k, replace=False))]
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed % 2**31), spherical=True,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
                      verbose=False)
    # OpenMP costs more than it gains on small k-means, so they run on one thread (docs/memory_store.md, "The tree").
    threads = faiss.omp_get_max_threads()
    if len(x) < _SMALL_KMEANS:
        faiss.omp_set_num_threads(1)
    try:
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    assert km.centroids is not None
    return normalize(km.centroids)


def _split_node(x: np.ndarray, parent_c: np.ndarray, k: int, seed: int, niter: int, mppc: int,
                balance: float, max_rounds: int) -> np.ndarray:
    """k child centroids for the points x of one node, balanced by the paper's rule."""
    n = len(x)
    if n == 0:
        # Empty node: children spread around the parent so routing still has somewhere to go.
        rng = np.random.default_rng(seed)
        return normalize(parent_c + 0.1 * normalize(rng.standard_normal((k, x.shape[1]), dtype=np.float32)))
    uniq = np.unique(x, axis=0) if n <= 4 * k else x  # only small nodes can lack k distinct points
    if len(uniq) <= k:
        # Fewer distinct points than children: one child per point; the rest sit at the antipode of the
        # parent, so no point of this node (and almost no query routed here) ever reaches them.
        c = np.repeat(-normalize(parent_c[None]), k, axis=0)
        c[:len(uniq)] = uniq
        return normalize(c)
    c = _kmeans(x, k, seed, niter, mppc)
    limit = balance * n / k
    for r in range(max_rounds):
        # a BLAS matmul is fine here: these counts only steer balancing; the assignment that is kept
        # is recomputed level-wide by _nearest_child, the routing function
        assign = np.argmax(x @ c.T, axis=1)
        counts = np.bincount(assign, minlength=k)
        big, small = int(np.argmax(counts)), int(np.argmin(counts))
        if counts[big] <= limit:
            break
        # The big child is split in two, taking the smallest child's slot; the smallest child's points
        # then go to their nearest remaining centroid.
        members = x[assign == big]
        if np.ptp(members, axis=0).max() == 0:
            break  # identical points cannot be split
        c[[big, small]] = _kmeans(members, 2, seed + 7919 * (r + 1), niter, mppc)
    return c


def build_tree(emb: np.ndarray, branching: list[int], *, seed: int = 0, niter: int = 20,
               max_points_per_centroid: int = 256, balance: float = 1.5, max_balance_rounds: int | None = None,
               progress: bool = False) -> Tree:
    """Hierarchical k-means, level by level from the root.

    Args:
        emb: `[N, dim]` embeddings (normalised here).
        branching: children per node, per level.
        seed: seeds every k-means (per node: seed, level and index combined).
        niter: k-means iterations.
        max_points_per_centroid: a node with more than this many points per child trains its centroids on
            a seeded sample of that size, then assigns all of its points.
        balance: a child with more than `balance * n / k` of its node's n points is split in two (2-means
            on its points), the second half taking the place of the smallest child, as in the paper;
            repeated until no child is too big (or max_balance_rounds).
        max_balance_rounds: cap on such re-splits per node (default 2k).
    Returns:
        The tree, with `assignments` (`[N, depth]`) = the route of every training point.
    """
    emb = normalize(emb)
    n, dim = emb.shape
    centroids, parents = [], []
    node = np.zeros(n, dtype=np.int64)
    prev_c = np.zeros((1, dim), dtype=np.float32)
    paths = np.empty((n, len(branching)), dtype=np.int64)
    for level, k in enumerate(branching, start=1):
        n_parents = len(prev_c)
        c = np.empty((n_parents * k, dim), dtype=np.float32)
        order = np.argsort(node, kind="stable")
        bounds = np.searchsorted(node[order], np.arange(n_parents + 1))
        it = range(n_parents)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"tree level {level}", unit="node")
        # One BLAS thread: the per-node matmuls are small and threaded BLAS spins (docs/memory_store.md, "The tree").
        with threadpool_limits(limits=1, user_api="blas"):
            for p in it:
                members = order[bounds[p]:bounds[p + 1]]
                c[p * k:(p + 1) * k] = _split_node(
                    emb[members], prev_c[p], k, seed=seed + 1_000_003 * level + 7 * p, niter=niter,
                    mppc=max_points_per_centroid, balance=balance,
                    max_rounds=max_balance_rounds if max_balance_rounds is not None else 2 * k)
        node = _nearest_child(emb, node, c, k)
        paths[:, level - 1] = node
        centroids.append(c)
        parents.append(np.repeat(np.arange(n_parents, dtype=np.int64), k))
        prev_c = c
        log.info("tree level %d: %d nodes, largest %d points, %d empty", level, len(c),
                 int(np.bincount(node, minlength=len(c)).max()), int((np.bincount(node, minlength=len(c)) == 0).sum()))
    tree = Tree(centroids, parents)
    tree.assignments = paths
    return tree
