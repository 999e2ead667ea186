"""BankWriter: streams a bank to disk with bounded RAM and publishes it atomically."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from memory_store import layout
from memory_store.errors import BankError, InvalidSpec
from memory_store.fileformat import StreamingFile, TensorEntry, crc32c, write_file
from memory_store.spec import AnchorIdentity, BankSpec, NodeRef
from memory_store.tree import Tree

log = logging.getLogger(__name__)


def to_bank_bytes(array, spec: BankSpec, shape: tuple[int, ...]) -> memoryview:
    """A block (numpy array or torch tensor) as the bank dtype's raw bytes, C order.

    A numpy uint16 array is taken as raw bfloat16 bits when the bank is bfloat16 (numpy has no bf16). An int8
    bank quantizes the block row by row, each row's scale stored after it (an int8 array in the stored shape
    is taken as already packed)."""
    if spec.dtype == "int8" and str(array.dtype) in ("int8", "torch.int8"):  # already packed: copied as it is
        if tuple(array.shape) != spec.stored_shape(tuple(shape)):
            raise InvalidSpec(f"packed block shape {tuple(array.shape)} does not match the spec's "
                              f"{spec.stored_shape(tuple(shape))}")
        raw = array.numpy() if hasattr(array, "numpy") else array
        return np.ascontiguousarray(raw).data.cast("B")
    if tuple(array.shape) != tuple(shape):
        raise InvalidSpec(f"block shape {tuple(array.shape)} does not match the spec's {tuple(shape)}")
    if spec.dtype == "int8":  # each row quantized with its own scale (memory_store/quant.py)
        from memory_store.quant import pack_rows

        return pack_rows(array).data.cast("B")
    if isinstance(array, np.ndarray):
        if spec.dtype == "bfloat16" and array.dtype == np.uint16:
            return np.ascontiguousarray(array).data.cast("B")
        if spec.dtype != "bfloat16":
            return np.ascontiguousarray(array, dtype=spec.dtype).data.cast("B")
        import torch

        array = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    import torch

    t = array.detach().to("cpu", getattr(torch, spec.dtype)).contiguous()
    return t.view(torch.uint8).numpy().data.cast("B")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename a finished temporary bank directory onto its final name (replacing an old one if asked)."""
    old = None
    if final.exists():
        if not overwrite:
            raise BankError(f"{final} exists (pass overwrite=True / --force to replace it)")
        old = final.with_name(f"{final.name}.old-{secrets.token_hex(4)}")
        os.rename(final, old)  # readers that hold mmaps of old files keep them
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class BankWriter:
    """Writes a bank: `with BankWriter(dir, spec, anchor, tree, n_shards) as w: w.write_block(ref, a)`.

    Everything goes to `<dir>.tmp-<random>`; on a clean exit the manifest (per-block crc32c, content-hash
    bank_id) is written last, fsynced, and the directory renamed onto `dir`. On an exception the temporary
    directory is removed; a killed writer leaves only a `.tmp-` directory without a manifest. Either way no
    loadable bank appears at `dir`. Blocks may come in any order; each is written straight to its planned
    offset, so RAM stays at one block.

    Args:
        dir: the bank directory to create.
        spec, anchor, tree: the bank's layout, anchor identity and tree (must match the spec).
        n_shards: shards to cut at `spec.shard_level`.
        overwrite: replace an existing bank at `dir` (atomically, by rename).
        allow_missing: record blocks never written as absent (readers raise NodeNotFound) instead of failing.
    """

    def __init__(self, dir: str | Path, spec: BankSpec, anchor: AnchorIdentity | dict[str, Any], tree: Tree,
                 n_shards: int = 1, *, overwrite: bool = False, allow_missing: bool = False):
        self.dir = Path(dir)
        self.spec = spec
        self.anchor = AnchorIdentity.model_validate(anchor if isinstance(anchor, dict) else anchor.model_dump())
        if tree.branching != list(spec.branching):
            raise InvalidSpec(f"tree branching {tree.branching} does not match spec branching {spec.branching}")
        if tree.dim != spec.embedder_dim:
            raise InvalidSpec(f"tree dim {tree.dim} does not match spec embedder_dim {spec.embedder_dim}")
        self.tree = tree
        self.subtrees = layout.split_subtrees(spec, n_shards)
        self.shard_ids = layout.shard_ids(n_shards)
        self.overwrite = overwrite
        self.allow_missing = allow_missing
        if self.dir.exists() and not overwrite:
            raise BankError(f"{self.dir} exists (pass overwrite=True / --force to replace it)")
        self.tmp = self.dir.with_name(f"{self.dir.name}.tmp-{secrets.token_hex(4)}")
        self._files: dict[tuple[str, int], StreamingFile] = {}
        # which shards hold each level's index (an index above the shard level may be in several)
        self._holders: dict[int, list[tuple[str, range]]] = {}
        self.crcs = {lv: [0] * spec.nodes_at(lv) for lv in range(1, spec.depth + 1)}
        self.present = {lv: [False] * spec.nodes_at(lv) for lv in range(1, spec.depth + 1)}
        self.written = {lv: np.zeros(spec.nodes_at(lv), dtype=bool) for lv in range(1, spec.depth + 1)}
        self.generic_crc: int | None = None
        # Recorded in the manifest (not in bank_id, which covers the present flags already): the roots of
        # the subtrees deleted from this bank or its ancestors, and whether the generic memory was trained
        # before some of them were deleted (then it may still hold what they held).
        self.deleted: set[NodeRef] = set()
        self.generic_predates_deletions = False
        self._linked: set[tuple[str, int]] = set()
        self._open = False

    def __enter__(self) -> BankWriter:
        self.tmp.mkdir(parents=True)
        dt = layout.st_dtype(self.spec)
        for sid, sub in zip(self.shard_ids, self.subtrees, strict=True):
            (self.tmp / "shards" / sid).mkdir(parents=True)
            for level in range(1, self.spec.depth + 1):
                nodes = layout.nodes_in_shard(self.spec, sub, level)
                shape = self.spec.stored_shape(self.spec.block_shape(level))
                nbytes = self.spec.bytes_per_block(level)
                entries = [TensorEntry(layout.tensor_name(i), dt, shape, nbytes) for i in nodes]
                path = self.tmp / layout.level_file(sid, level)
                self._files[sid, level] = StreamingFile(path, entries, {"format": layout.FORMAT,
                                                                         "shard": sid, "level": str(level)})
                self._holders.setdefault(level, []).append((sid, nodes))
        self._open = True
        return self

    def _shards_for(self, ref: NodeRef) -> list[str]:
        return [sid for sid, nodes in self._holders[ref.level] if ref.index in nodes]

    def is_linked(self, shard_id: str, level: int) -> bool:
        return (shard_id, level) in self._linked

    def holders(self, ref) -> list[str]:
        """The shards whose files store this node."""
        return self._shards_for(layout.check_ref_in(self.spec, ref))

    def link_file(self, shard_id: str, level: int, src: str | Path, crcs, present) -> bool:
        """Adopt an existing shard file with exactly the planned layout (same spec and shard cut), by hard
        link (copy across file systems), instead of rewriting its blocks; `crcs`/`present` are the source
        manifest's per-level lists. Returns False, changing nothing, when the layouts differ. Used by
        reshard/delete for files the edit does not touch; files are never modified in place, so sharing
        an inode between the old and the new bank is safe."""
        f = self._files[shard_id, level]
        head = f.header
        with open(src, "rb") as s:
            if s.read(len(head)) != head or os.fstat(s.fileno()).st_size != f.size:
                return False
        f.close(sync=False)
        os.unlink(f.path)
        try:
            os.link(src, f.path)
        except OSError:
            shutil.copyfile(src, f.path)
        del self._files[shard_id, level]
        self._linked.add((shard_id, level))
        for i in dict(self._holders[level])[shard_id]:
            self.crcs[level][i] = int(crcs[i])
            self.present[level][i] = bool(present[i])
            self.written[level][i] = True
        return True

    def write_block(self, ref, array) -> None:
        """Write one node's block `[L_mem, 3, r_l, d]` (numpy or torch, converted to the bank dtype)."""
        ref = layout.check_ref_in(self.spec, ref)
        self.write_block_bytes(ref, to_bank_bytes(array, self.spec, self.spec.block_shape(ref.level)))

    def write_block_bytes(self, ref, data, crc: int | None = None) -> None:
        """Write one block given as raw bytes in the bank dtype (crc32c computed unless given)."""
        if not self._open:
            raise BankError("BankWriter is not open: use it as a context manager")
        ref = layout.check_ref_in(self.spec, ref)
        for sid in self._shards_for(ref):
            if (sid, ref.level) not in self._linked:
                self._files[sid, ref.level].write(layout.tensor_name(ref.index), data)
        self.crcs[ref.level][ref.index] = crc32c(data) if crc is None else int(crc)
        self.present[ref.level][ref.index] = True
        self.written[ref.level][ref.index] = True

    def mark_absent(self, ref) -> None:
        """Record a node as absent (deleted): its bytes stay zero on disk and readers raise NodeNotFound."""
        ref = layout.check_ref_in(self.spec, ref)
        zeros = bytes(self.spec.bytes_per_block(ref.level))
        for sid in self._shards_for(ref):
            if (sid, ref.level) in self._linked:
                raise BankError(f"node {ref} is in linked file shard {sid} level {ref.level}: cannot change it")
            self._files[sid, ref.level].write(layout.tensor_name(ref.index), zeros)
        self.crcs[ref.level][ref.index] = 0
        self.present[ref.level][ref.index] = False
        self.written[ref.level][ref.index] = True

    def write_generic(self, array) -> None:
        """The generic memory `[L_mem, 3, sum(ranks), d]` (the no-retrieval control), in generic.safetensors."""
        if not self._open:
            raise BankError("BankWriter is not open: use it as a context manager")
        data = to_bank_bytes(array, self.spec, self.spec.generic_shape)
        write_file(self.tmp / layout.GENERIC_FILE,
                   {"generic": (layout.st_dtype(self.spec), self.spec.stored_shape(self.spec.generic_shape), data)},
                   {"format": layout.FORMAT})
        self.generic_crc = crc32c(data)

    def _close_files(self, sync: bool) -> None:
        for f in self._files.values():
            f.close(sync=sync)
        self._open = False

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._close_files(sync=False)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            missing = {lv: int((~w).sum()) for lv, w in self.written.items() if not w.all()}
            if missing and not self.allow_missing:
                raise BankError(f"blocks never written (per level: {missing}); write them or pass "
                                "allow_missing=True to record them as absent")
            self._close_files(sync=True)
            self.bank_id = self._publish()
        except BaseException:
            self._close_files(sync=False)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        log.info("bank %s written to %s", self.bank_id[:12], self.dir)

    def _publish(self) -> str:
        self.tree.save(self.tmp / layout.TREE_FILE)
        tree_crc = tree_content_crc(self.tree)
        anchor = self.anchor.model_dump()
        bank_id = layout.content_hash(self.spec, anchor, tree_crc, self.generic_crc, self.crcs, self.present)
        manifest = {
            "format": layout.FORMAT,
            "bank_id": bank_id,
            "spec": self.spec.model_dump(mode="json"),
            "anchor": anchor,
            "tree": {"file": layout.TREE_FILE, "crc32c": tree_crc},
            "generic": None if self.generic_crc is None else {
                "file": layout.GENERIC_FILE, "crc32c": self.generic_crc,
                "predates_deletions": bool(self.generic_predates_deletions and self.deleted)},
            "deleted": [[r.level, r.index] for r in sorted(self.deleted)],
            "shards": [{"id": sid, "subtrees": list(sub)} for sid, sub in
                       zip(self.shard_ids, self.subtrees, strict=True)],
            "blocks": {str(lv): {"crc32c": self.crcs[lv], "present": self.present[lv]}
                       for lv in range(1, self.spec.depth + 1)},
        }
        part = self.tmp / (layout.MANIFEST + ".part")
        with open(part, "w") as f:
            json.dump(manifest, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.rename(part, self.tmp / layout.MANIFEST)
        for d in [self.tmp, *(self.tmp / "shards" / sid for sid in self.shard_ids), self.tmp / "shards"]:
            _fsync_dir(d)
        publish_dir(self.tmp, self.dir, self.overwrite)
        return bank_id


def tree_content_crc(tree: Tree) -> int:
    """crc32c over the tree's arrays (not the file bytes, which depend on the serializer)."""
    crc = 0
    for c, p in zip(tree.centroids, tree.parents, strict=True):
        crc = crc32c(np.ascontiguousarray(c, dtype="<f4").data.cast("B"), crc)
        crc = crc32c(np.ascontiguousarray(p, dtype="<i8").data.cast("B"), crc)
    return crc
