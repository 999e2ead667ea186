"""Issue 12, finding 1 and 4 (memory_store half): bank operations never modify a directory that may be
served; a versioned root's `current` pointer selects what new processes open; the manifest records
deleted nodes; the routed path is cut at the deepest present level; the generic memory's relation to a
deletion is recorded."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from memory_store import Bank, BankError, NodeRef
from memory_store.ops import (
    add_version,
    delete_subtrees,
    init_version_root,
    inspect_bank,
    list_versions,
    reshard,
    use_version,
)

from .conftest import tiny_spec, write_bank


def _digest(d) -> dict[str, str]:
    """Every file under d -> sha256 of its bytes (and the directory's own listing)."""
    out = {}
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_delete_and_reshard_never_rewrite_a_plain_bank_directory_in_place(tmp_path):
    spec = tiny_spec(branching=[2, 3])
    write_bank(tmp_path / "b", spec, n_shards=2)
    before = _digest(tmp_path / "b")
    with pytest.raises(BankError, match="--out"):
        delete_subtrees(tmp_path / "b", [NodeRef(1, 1)])
    with pytest.raises(BankError, match="--out"):
        reshard(tmp_path / "b", 1)
    assert _digest(tmp_path / "b") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_versioned_root_gets_a_new_version_and_the_served_one_is_untouched(tmp_path):
    spec = tiny_spec(branching=[2, 3])
    old_id, blocks, generic = write_bank(tmp_path / "b", spec, n_shards=2)
    root = tmp_path / "root"
    first = init_version_root(tmp_path / "b", root)
    served = Bank.open(root)  # what a running shard holds: the version `current` pointed at when it opened
    assert served.bank_id == old_id and served.dir == (root / "versions" / first).resolve()
    before = _digest(served.dir)

    new_id = delete_subtrees(root, [NodeRef(1, 1)])
    assert new_id != old_id
    assert _digest(served.dir) == before  # the old version is never modified
    # an open Bank keeps reading its own version even for files it maps only now (lazily)
    np.testing.assert_array_equal(served.read_block(NodeRef(2, 4)).numpy(), blocks[NodeRef(2, 4)])
    fresh = Bank.open(root)  # a process started now serves the new version
    assert fresh.bank_id == new_id and fresh.dir != served.dir
    assert not fresh.is_present(NodeRef(2, 4))
    names = [v["name"] for v in list_versions(root)]
    assert len(names) == 2 and first in names and fresh.dir.name in names
    assert [v["current"] for v in list_versions(root)].count(True) == 1

    # reshard writes a third version (same bank_id, another layout); roll back by re-pointing current
    assert reshard(root, 1) == new_id
    assert len(Bank.open(root).shard_ids) == 1 and len(list_versions(root)) == 3
    use_version(root, first)
    assert Bank.open(root).bank_id == old_id
    # a retrained bank (here: another seed) is published as the next version
    retrained_id, _, _ = write_bank(tmp_path / "retrained", spec, n_shards=2, seed=7)
    name = add_version(tmp_path / "retrained", root)
    assert Bank.open(root).bank_id == retrained_id and name.startswith("v0004-")
    with pytest.raises(BankError):  # a bank for another anchor is refused
        write_bank(tmp_path / "other", tiny_spec(branching=[2, 3], d_model=16), n_shards=1)
        add_version(tmp_path / "other", tmp_path / "b")


def test_manifest_records_deleted_roots_and_the_generic_memory_that_predates_them(tmp_path):
    spec = tiny_spec(branching=[2, 3])
    _, _, generic = write_bank(tmp_path / "b", spec, n_shards=2)
    delete_subtrees(tmp_path / "b", [NodeRef(2, 4)], out=tmp_path / "d")
    bank = Bank.open(tmp_path / "d")
    assert bank.deleted_roots == [NodeRef(2, 4)]
    assert bank.is_deleted(NodeRef(2, 4)) and not bank.is_deleted(NodeRef(2, 3))
    # the generic memory is carried over unchanged: it was trained with what was deleted, and says so
    np.testing.assert_array_equal(bank.generic_block().numpy(), generic)
    info = inspect_bank(tmp_path / "d")
    assert info["deleted"] == ["2:4"] and info["generic_predates_deletions"] is True
    # a later deletion adds to the record
    delete_subtrees(tmp_path / "d", [NodeRef(1, 0)], out=tmp_path / "e")
    assert Bank.open(tmp_path / "e").deleted_roots == [NodeRef(1, 0), NodeRef(2, 4)]
    # an untouched bank records nothing
    assert Bank.open(tmp_path / "b").deleted_roots == [] and not inspect_bank(tmp_path / "b")["deleted"]


def test_present_prefix_cuts_a_path_at_the_first_deleted_node(tmp_path):
    spec = tiny_spec(branching=[2, 3, 2], ranks=[4, 2, 2])
    write_bank(tmp_path / "b", spec, n_shards=2)
    delete_subtrees(tmp_path / "b", [NodeRef(2, 4)], out=tmp_path / "d")
    bank = Bank.open(tmp_path / "d")
    assert bank.present_prefix([1, 4, 8]) == [1]  # 2:4 and its children are gone
    assert bank.present_prefix([1, 5, 10]) == [1, 5, 10]
    assert bank.present_prefix([1]) == [1] and bank.present_prefix([]) == []
    delete_subtrees(tmp_path / "d", [NodeRef(1, 0)], out=tmp_path / "e")
    assert Bank.open(tmp_path / "e").present_prefix([0, 1, 2]) == []
