import mmap
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open

from memory_store import Bank, BankError, BankWriter, BlockCorrupt, InvalidSpec, NodeNotFound, NodeRef
from memory_store.ops import delete_subtrees, init_version_root, reshard, verify_bank
from memory_store.tree import random_tree

from .conftest import ANCHOR, random_blocks, tiny_spec, write_bank


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    spec = tiny_spec(dtype=dtype)
    bank_id, blocks, generic = write_bank(tmp_path / "b", spec, n_shards=2)
    bank = Bank.open(tmp_path / "b")
    assert bank.bank_id == bank_id and bank.spec == spec and bank.anchor == ANCHOR
    tdt = getattr(torch, dtype)
    for ref, block in blocks.items():
        got = bank.read_block(ref)
        assert got.dtype == tdt and tuple(got.shape) == spec.block_shape(ref.level)
        want = torch.from_numpy(block).to(tdt)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), ref  # bit for bit
        info = bank.block_info(ref)
        assert info.present and info.nbytes == want.numel() * want.element_size()
    assert torch.equal(bank.generic_block(), torch.from_numpy(generic).to(tdt))


def test_shard_files_are_plain_safetensors(tmp_path, spec):
    _, blocks, _ = write_bank(tmp_path / "b", spec, n_shards=2)
    bank = Bank.open(tmp_path / "b")
    for sid in bank.shard_ids:
        with safe_open(tmp_path / "b" / "shards" / sid / "level-2.safetensors", framework="np") as f:
            for key in f.keys():
                ref = NodeRef(2, int(key[1:]))
                assert bank.shard_of(ref) == sid
                np.testing.assert_array_equal(f.get_tensor(key), blocks[ref])


def test_block_read_is_a_view_of_the_mapped_file(tmp_path, spec):
    write_bank(tmp_path / "b", spec)
    bank = Bank.open(tmp_path / "b")
    view = bank.read_block_bytes(NodeRef(2, 4))
    assert isinstance(view, memoryview) and view.readonly
    assert isinstance(view.obj, mmap.mmap)  # a slice of the mapping, not a copy of the level file
    assert view.nbytes == spec.bytes_per_block(2)


def test_block_read_does_not_load_the_level_into_memory(tmp_path):
    import psutil

    spec = tiny_spec(branching=[2, 64], ranks=[64, 64], memory_layers=list(range(8)), n_layers=8,
                     d_model=512, dtype="float16")  # level 2: 128 blocks of 1.5 MiB = 192 MiB
    tree = random_tree([2, 64], 16)
    block = np.ones(spec.block_shape(2), dtype=np.float16)
    with BankWriter(tmp_path / "b", spec, ANCHOR, tree, 1) as w:
        for lv in (1, 2):
            for i in range(spec.nodes_at(lv)):
                w.write_block(NodeRef(lv, i), np.ones(spec.block_shape(lv), dtype=np.float16) if lv == 1 else block)
    level_file = tmp_path / "b" / "shards" / "0" / "level-2.safetensors"
    fd = os.open(level_file, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    bank = Bank.open(tmp_path / "b")
    proc = psutil.Process()
    before = proc.memory_info().rss
    for i in (3, 70, 127):
        bank.read_block_bytes(NodeRef(2, i), verify=True)
    grown = proc.memory_info().rss - before
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB reading 3 blocks of a 192 MiB level"


def test_flipped_byte_is_detected_by_reads_and_verify(tmp_path, spec):
    write_bank(tmp_path / "b", spec, n_shards=2)
    bank = Bank.open(tmp_path / "b")
    ref = NodeRef(2, 5)
    sid = bank.shard_of(ref)
    path = tmp_path / "b" / "shards" / sid / "level-2.safetensors"
    with safe_open(path, framework="np") as f:
        assert "n5" in f.keys()
    from memory_store.fileformat import MappedFile

    mf = MappedFile(path)
    offset = mf.data_start + mf.entries["n5"]["data_offsets"][0] + 7
    mf.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    assert verify_bank(tmp_path / "b").ok is False
    fresh = Bank.open(tmp_path / "b")
    with pytest.raises(BlockCorrupt, match="2:5"):
        fresh.read_block(ref)
    fresh.read_block(NodeRef(2, 4))  # the others still read
    report = verify_bank(tmp_path / "b")
    assert len(report.problems) == 1 and "2:5" in report.problems[0]


def test_writer_exception_leaves_no_bank(tmp_path, spec):
    tree = random_tree(list(spec.branching), spec.embedder_dim)
    with pytest.raises(RuntimeError), BankWriter(tmp_path / "b", spec, ANCHOR, tree, 1) as w:
        w.write_block(NodeRef(1, 0), np.zeros(spec.block_shape(1), dtype=np.float32))
        raise RuntimeError("interrupted")
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too
    with pytest.raises(BankError, match="not a bank"):
        Bank.open(tmp_path / "b")


def test_killed_writer_leaves_no_loadable_bank(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        sys.path.insert(0, {str(os.getcwd())!r})
        from memory_store import BankWriter, NodeRef
        from memory_store.tree import random_tree
        from tests.memory_store.conftest import ANCHOR, tiny_spec
        spec = tiny_spec()
        with BankWriter({str(tmp_path / "b")!r}, spec, ANCHOR, random_tree([2, 3], 16), 1) as w:
            w.write_block(NodeRef(1, 0), np.zeros(spec.block_shape(1), dtype=np.float32))
            print("WRITING", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    leftovers = list(tmp_path.iterdir())
    assert not (tmp_path / "b").exists() and len(leftovers) == 1 and ".tmp-" in leftovers[0].name
    for d in (tmp_path / "b", leftovers[0]):
        with pytest.raises(BankError):
            Bank.open(d)


def test_missing_blocks_are_an_error_unless_allowed(tmp_path, spec):
    tree = random_tree(list(spec.branching), spec.embedder_dim)
    with pytest.raises(BankError, match="never written"), BankWriter(tmp_path / "a", spec, ANCHOR, tree, 1) as w:
        w.write_block(NodeRef(1, 0), np.zeros(spec.block_shape(1), dtype=np.float32))
    assert not (tmp_path / "a").exists()
    with BankWriter(tmp_path / "b", spec, ANCHOR, tree, 1, allow_missing=True) as w:
        w.write_block(NodeRef(1, 0), np.zeros(spec.block_shape(1), dtype=np.float32))
    bank = Bank.open(tmp_path / "b")
    assert bank.read_block(NodeRef(1, 0)).abs().sum() == 0
    with pytest.raises(NodeNotFound):
        bank.read_block(NodeRef(1, 1))


def test_writer_checks_shapes_and_refs(tmp_path, spec):
    tree = random_tree(list(spec.branching), spec.embedder_dim)
    with pytest.raises(InvalidSpec, match="shape"), BankWriter(tmp_path / "b", spec, ANCHOR, tree, 1) as w:
        w.write_block(NodeRef(1, 0), np.zeros(spec.block_shape(2), dtype=np.float32))
    with pytest.raises(InvalidSpec, match="out of range"), BankWriter(tmp_path / "b", spec, ANCHOR, tree, 1) as w:
        w.write_block(NodeRef(1, 2), np.zeros(spec.block_shape(1), dtype=np.float32))
    with pytest.raises(InvalidSpec, match="branching"):
        BankWriter(tmp_path / "b", spec, ANCHOR, random_tree([3, 2], spec.embedder_dim), 1)
    write_bank(tmp_path / "c", spec)
    with pytest.raises(BankError, match="exists"):
        write_bank(tmp_path / "c", spec)


def test_reshard_keeps_bank_id_and_every_block(tmp_path):
    spec = tiny_spec(branching=[4, 2], ranks=[4, 2])
    bank_id, blocks, generic = write_bank(tmp_path / "b", spec, n_shards=1)
    assert reshard(tmp_path / "b", 3, out=tmp_path / "r") == bank_id
    init_version_root(tmp_path / "b", tmp_path / "root")
    assert reshard(tmp_path / "root", 4) == bank_id  # a new version of the root
    for d, n in ((tmp_path / "r", 3), (tmp_path / "root" / "current", 4)):
        bank = Bank.open(d)
        assert bank.bank_id == bank_id and len(bank.shard_ids) == n
        assert sorted(r.index for s in bank.shard_ids for r in bank.owned_subtrees(s)) == [0, 1, 2, 3]
        for ref, block in blocks.items():
            np.testing.assert_array_equal(bank.read_block(ref).numpy(), block)
        np.testing.assert_array_equal(bank.generic_block().numpy(), generic)
        assert len(list((d / "shards").iterdir())) == n


def test_shard_level_two_stores_ancestors_in_every_owning_shard(tmp_path):
    spec = tiny_spec(branching=[2, 3], shard_level=2)
    _, blocks, _ = write_bank(tmp_path / "b", spec, n_shards=3)  # 6 level-2 subtrees over 3 shards
    bank = Bank.open(tmp_path / "b")
    assert bank.owned_subtrees("1") == [NodeRef(2, 2), NodeRef(2, 3)]
    assert bank.shards_of(NodeRef(1, 0)) == ["0", "1"]  # 1:0 has children 2:0..2:2
    for sid in ("0", "1"):
        np.testing.assert_array_equal(
            np.frombuffer(bank.read_block_bytes(NodeRef(1, 0), shard=sid), dtype=np.float32),
            blocks[NodeRef(1, 0)].ravel())
    with pytest.raises(NodeNotFound):
        bank.read_block_bytes(NodeRef(1, 0), shard="2")
    assert verify_bank(tmp_path / "b").ok


def test_deleted_subtree_reads_as_absent(tmp_path):
    spec = tiny_spec(branching=[2, 3])
    bank_id, blocks, _ = write_bank(tmp_path / "b", spec, n_shards=2)
    new_id = delete_subtrees(tmp_path / "b", [NodeRef(1, 1)], out=tmp_path / "d")
    assert new_id != bank_id
    bank = Bank.open(tmp_path / "d")
    assert bank.bank_id == new_id
    for ref in [NodeRef(1, 1), NodeRef(2, 3), NodeRef(2, 4), NodeRef(2, 5)]:
        assert not bank.block_info(ref).present
        with pytest.raises(NodeNotFound, match="absent"):
            bank.read_block(ref)
    for ref in [NodeRef(1, 0), NodeRef(2, 0), NodeRef(2, 2)]:
        np.testing.assert_array_equal(bank.read_block(ref).numpy(), blocks[ref])
    # the bytes are gone from disk too, not only hidden by the manifest
    raw = (tmp_path / "d" / "shards" / "1" / "level-2.safetensors").read_bytes()
    assert blocks[NodeRef(2, 4)].tobytes() not in raw
    report = verify_bank(tmp_path / "d")
    assert report.ok and report.absent == 4


def test_zeroed_subtree_reads_as_zeros(tmp_path, spec):
    bank_id, blocks, _ = write_bank(tmp_path / "b", spec)
    new_id = delete_subtrees(tmp_path / "b", [NodeRef(2, 1)], zero=True, out=tmp_path / "z")
    assert new_id != bank_id and Bank.open(tmp_path / "b").bank_id == bank_id
    bank = Bank.open(tmp_path / "z")
    assert bank.read_block(NodeRef(2, 1)).abs().sum() == 0
    np.testing.assert_array_equal(bank.read_block(NodeRef(2, 2)).numpy(), blocks[NodeRef(2, 2)])


def test_rewrite_replaces_single_blocks_and_links_the_rest(tmp_path):
    """`rewrite_bank(replace=...)` (how `hiermem bank update` writes retrained leaves): the named blocks take
    the new values, every other block its old bytes, and shard files without a replaced node are linked."""
    from memory_store.ops import rewrite_bank

    spec = tiny_spec(branching=[2, 3])
    _, blocks, _ = write_bank(tmp_path / "b", spec, n_shards=2)
    new = np.full(spec.block_shape(2), 0.5, dtype=np.float32)
    rewrite_bank(tmp_path / "b", tmp_path / "r", replace={NodeRef(2, 4): new})
    bank = Bank.open(tmp_path / "r")
    np.testing.assert_array_equal(bank.read_block(NodeRef(2, 4)).numpy(), new.astype(bank.read_block(NodeRef(2, 4)).numpy().dtype))
    for ref, block in blocks.items():
        if ref != NodeRef(2, 4):
            np.testing.assert_array_equal(bank.read_block(ref).numpy(), block)
    ino = lambda d, sid, lv: (d / "shards" / sid / f"level-{lv}.safetensors").stat().st_ino  # noqa: E731
    assert ino(tmp_path / "b", "0", 2) == ino(tmp_path / "r", "0", 2)
    assert ino(tmp_path / "b", "1", 2) != ino(tmp_path / "r", "1", 2)
    assert verify_bank(tmp_path / "r").ok


def test_bank_id_is_a_content_hash(tmp_path, spec):
    a, _, _ = write_bank(tmp_path / "a", spec, n_shards=1, seed=0)
    b, _, _ = write_bank(tmp_path / "b", spec, n_shards=2, seed=0)
    c, _, _ = write_bank(tmp_path / "c", spec, n_shards=2, seed=1)
    assert a == b != c


def test_no_generic_memory_gives_none(tmp_path, spec):
    write_bank(tmp_path / "b", spec, generic=False)
    assert Bank.open(tmp_path / "b").generic_block() is None


def test_random_blocks_helper_covers_every_node(spec):
    assert len(random_blocks(spec)) == spec.nodes_at(1) + spec.nodes_at(2)


def test_rss_stays_bounded_when_reading_many_blocks(tmp_path):
    spec = tiny_spec(branching=[2, 64], ranks=[64, 64], memory_layers=list(range(8)), n_layers=8,
                     d_model=512, dtype="float16")  # level 2: 128 blocks of 1.5 MiB = 192 MiB
    rng = np.random.default_rng(0)
    with BankWriter(tmp_path / "b", spec, ANCHOR, random_tree([2, 64], 16), 1) as w:
        for lv in (1, 2):
            for i in range(spec.nodes_at(lv)):
                w.write_block(NodeRef(lv, i), rng.standard_normal(spec.block_shape(lv), dtype=np.float32))

    def file_rss_growth(budget):
        import psutil

        bank = Bank.open(tmp_path / "b", mapped_budget_bytes=budget)
        before = psutil.Process().memory_full_info().rss
        views = [bank.read_block_bytes(NodeRef(2, i)) for i in range(128)]
        grown = psutil.Process().memory_full_info().rss - before
        # views taken before a release still read the right bytes
        assert crc_ok(bank, views[3], NodeRef(2, 3))
        del views
        bank.close()
        return grown

    assert file_rss_growth(0) > 150 * 2**20  # without a budget every touched page stays mapped
    assert file_rss_growth(32 * 2**20) < 64 * 2**20


def crc_ok(bank, view, ref):
    from memory_store.fileformat import crc32c

    return crc32c(view) == bank.block_info(ref).crc32c


def test_bank_refuses_another_anchor_or_embedder(tmp_path, spec):
    from memory_store import AnchorIdentity, BankMismatch

    write_bank(tmp_path / "b", spec)
    bank = Bank.open(tmp_path / "b")
    bank.check_anchor(ANCHOR)
    bank.check_anchor(ANCHOR.model_dump())
    with pytest.raises(BankMismatch, match="built for anchor test-anchor"):
        bank.check_anchor(AnchorIdentity(arch="llama", hash="f" * 16))
    bank.check_embedder(spec.embedder_name, spec.embedder_dim)
    with pytest.raises(BankMismatch, match="routes with"):
        bank.check_embedder("other", 768)
    with pytest.raises(BankMismatch):
        bank.check_bank_id("0" * 64)


def test_delete_links_untouched_shard_files_and_rewrites_the_others(tmp_path):
    spec = tiny_spec(branching=[2, 3])
    _, blocks, _ = write_bank(tmp_path / "b", spec, n_shards=2)
    delete_subtrees(tmp_path / "b", [NodeRef(2, 4)], out=tmp_path / "d")  # in shard 1, level 2 only
    ino = lambda d, sid, lv: (d / "shards" / sid / f"level-{lv}.safetensors").stat().st_ino  # noqa: E731
    assert ino(tmp_path / "b", "0", 2) == ino(tmp_path / "d", "0", 2)
    assert ino(tmp_path / "b", "1", 1) == ino(tmp_path / "d", "1", 1)
    assert ino(tmp_path / "b", "1", 2) != ino(tmp_path / "d", "1", 2)
    bank = Bank.open(tmp_path / "d")
    with pytest.raises(NodeNotFound):
        bank.read_block(NodeRef(2, 4))
    for ref, block in blocks.items():
        if ref != NodeRef(2, 4):
            np.testing.assert_array_equal(bank.read_block(ref).numpy(), block)
    assert verify_bank(tmp_path / "d").ok
    # deleting again on top of a deletion keeps the earlier one
    delete_subtrees(tmp_path / "d", [NodeRef(1, 0)], out=tmp_path / "e")
    again = Bank.open(tmp_path / "e")
    assert not again.is_present(NodeRef(2, 4)) and not again.is_present(NodeRef(2, 1))
    assert again.is_present(NodeRef(2, 5))


def test_rewrite_of_a_corrupt_bank_fails_and_leaves_the_original(tmp_path, spec):
    bank_id, _, _ = write_bank(tmp_path / "b", spec, n_shards=2)
    path = tmp_path / "b" / "shards" / "1" / "level-2.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # last block of shard 1
    path.write_bytes(bytes(data))
    with pytest.raises(BlockCorrupt):
        reshard(tmp_path / "b", 1, out=tmp_path / "r")
    with pytest.raises(BlockCorrupt):  # rewrites shard 1's level-2 file, re-reading 2:5
        delete_subtrees(tmp_path / "b", [NodeRef(2, 3)], out=tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directory left behind
    assert Bank.open(tmp_path / "b").bank_id == bank_id


def test_a_corrupt_tree_is_refused(tmp_path, spec):
    write_bank(tmp_path / "b", spec)
    path = tmp_path / "b" / "tree.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BlockCorrupt, match="tree"):
        Bank.open(tmp_path / "b")
    report = verify_bank(tmp_path / "b")
    assert not report.ok and "tree" in report.problems[0]


def test_verify_reports_missing_and_truncated_shard_files(tmp_path, spec):
    write_bank(tmp_path / "b", spec, n_shards=2)
    (tmp_path / "b" / "shards" / "0" / "level-2.safetensors").unlink()
    path = tmp_path / "b" / "shards" / "1" / "level-1.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    report = verify_bank(tmp_path / "b")
    assert not report.ok
    text = "\n".join(report.problems)
    assert "missing" in text and "truncated" in text
