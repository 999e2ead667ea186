"""Tiny banks for memory_store tests (seconds each)."""

from __future__ import annotations

import numpy as np
import pytest

from memory_store import AnchorIdentity, BankSpec, BankWriter, NodeRef
from memory_store.tree import random_tree

ANCHOR = AnchorIdentity(arch="test-anchor", hash="0" * 16)


def tiny_spec(**overrides) -> BankSpec:
    fields = dict(branching=[2, 3], ranks=[4, 2], memory_layers=[0, 2], n_layers=3, d_model=8,
                  dtype="float32", embedder_dim=16)
    fields.update(overrides)
    return BankSpec(**fields)


def random_blocks(spec: BankSpec, seed: int = 0) -> dict[NodeRef, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {NodeRef(lv, i): rng.standard_normal(spec.block_shape(lv)).astype(np.float32)
            for lv in range(1, spec.depth + 1) for i in range(spec.nodes_at(lv))}


def write_bank(path, spec: BankSpec, n_shards: int = 2, seed: int = 0, generic: bool = True):
    """A complete bank with random blocks; returns (bank_id, blocks, generic array or None)."""
    blocks = random_blocks(spec, seed)
    tree = random_tree(list(spec.branching), spec.embedder_dim, seed=seed)
    g = np.random.default_rng(seed + 1).standard_normal(spec.generic_shape).astype(np.float32) if generic else None
    with BankWriter(path, spec, ANCHOR, tree, n_shards) as w:
        for ref, block in blocks.items():
            w.write_block(ref, block)
        if g is not None:
            w.write_generic(g)
    return w.bank_id, blocks, g


@pytest.fixture
def spec() -> BankSpec:
    return tiny_spec()
