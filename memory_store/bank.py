"""Bank: a bank directory opened for reading. Blocks are zero-copy views of memory-mapped shard files."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from memory_store import layout
from memory_store.errors import BankError, BankMismatch, BlockCorrupt, NodeNotFound
from memory_store.fileformat import MappedFile, crc32c
from memory_store.spec import AnchorIdentity, BankSpec, NodeRef
from memory_store.tree import Tree

log = logging.getLogger(__name__)


# Bytes of blocks read after which the mappings' pages are released (see MappedFile.release): file pages
# a process has touched count in its RSS even though the kernel may reclaim them; without this a full scan
# of a 9 GB bank showed an RSS of 8.6 GB.
DEFAULT_MAPPED_BUDGET = 1 << 30

# A versioned bank root: `versions/<name>/` holds immutable bank directories (never modified once
# written), `current` is a symlink to the one new processes open. Bank operations write a new version and
# re-point `current`; a running process keeps the version it opened (see docs/operating.md).
CURRENT = "current"
VERSIONS = "versions"


def is_version_root(path: str | Path) -> bool:
    """Whether `path` is a versioned bank root (a `current` pointer, no manifest of its own)."""
    p = Path(path)
    return not (p / layout.MANIFEST).is_file() and (p / CURRENT).is_symlink()


def resolve_bank_dir(path: str | Path) -> Path:
    """The real directory of the bank version at `path`: a plain bank directory itself, or the version a
    root's `current` points at now. Resolved once (symlinks followed), so a process keeps its version."""
    p = Path(path)
    if is_version_root(p):
        return (p / CURRENT).resolve()
    return p.resolve() if p.exists() else p


class BlockInfo(NamedTuple):
    shape: tuple[int, int, int, int]
    dtype: str
    nbytes: int
    crc32c: int
    present: bool


def bytes_to_tensor(buf, dtype: str, shape, packed: bool = False):
    """Raw bank-dtype bytes -> a torch tensor of that dtype (a copy, so it outlives the mapping). An int8
    block comes back dequantized to float32 in its logical `shape`, or with `packed` as it is stored (int8
    rows with their scales, memory_store/quant.py)."""
    import torch

    if dtype == "int8":
        from memory_store.quant import packed_shape, unpack_rows

        rows = np.frombuffer(buf, dtype=np.int8).reshape(packed_shape(tuple(shape)))
        return torch.from_numpy(rows.copy()) if packed else unpack_rows(rows)
    if dtype == "bfloat16":
        arr = np.frombuffer(buf, dtype=np.uint16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(buf, dtype=dtype).copy()).reshape(shape)


class Bank:
    """A bank on disk (docs/design.md §3). `Bank.open(dir)` reads manifest.json and tree.safetensors only;
    shard files are memory-mapped on first use. Safe to share between threads."""

    def __init__(self, dir: Path, manifest: dict, tree: Tree, readahead: bool = True,
                 mapped_budget_bytes: int = DEFAULT_MAPPED_BUDGET):
        self.dir = dir
        self.root: Path | None = None  # the versioned root it was opened through, if any
        self.readahead = readahead
        self.mapped_budget_bytes = mapped_budget_bytes
        self._touched = 0
        self.manifest = manifest
        self.bank_id: str = manifest["bank_id"]
        self.spec = BankSpec(**manifest["spec"])
        self.anchor = AnchorIdentity(**manifest["anchor"])
        self.tree = tree
        self.shard_ids: list[str] = [s["id"] for s in manifest["shards"]]
        self._subtrees = {s["id"]: tuple(s["subtrees"]) for s in manifest["shards"]}
        self._crc = {int(lv): np.asarray(b["crc32c"], dtype=np.int64) for lv, b in manifest["blocks"].items()}
        self._present = {int(lv): np.asarray(b["present"], dtype=bool) for lv, b in manifest["blocks"].items()}
        self.deleted_roots: list[NodeRef] = sorted(NodeRef(int(lv), int(i)) for lv, i in manifest.get("deleted", []))
        n_sl = self.spec.nodes_at(self.spec.shard_level)
        self._owner = np.empty(n_sl, dtype=np.int64)  # shard-level index -> position in shard_ids
        for pos, sid in enumerate(self.shard_ids):
            a, b = self._subtrees[sid]
            self._owner[a:b] = pos
        self._files: dict[tuple[str, int], MappedFile] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, dir: str | Path, *, readahead: bool = True,
             mapped_budget_bytes: int = DEFAULT_MAPPED_BUDGET) -> Bank:
        """Open a bank.

        Args:
            readahead: ask the kernel to read each block's whole range ahead of the copy or checksum
                (MADV_WILLNEED), which makes cold reads of large blocks several times faster.
            mapped_budget_bytes: after this many bytes of blocks read, drop the mapped pages from this
                process (they stay in the page cache), so RSS stays near this figure; 0 disables.
        """
        given = Path(dir)
        dir = resolve_bank_dir(given)
        path = dir / layout.MANIFEST
        if not path.is_file():
            raise BankError(f"{dir} is not a bank: no {layout.MANIFEST} (missing, or its write never finished)")
        try:
            manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise BankError(f"{path}: unreadable manifest ({exc})") from exc
        if manifest.get("format") != layout.FORMAT:
            raise BankError(f"{path}: format {manifest.get('format')!r}, expected {layout.FORMAT!r}")
        tree = Tree.load(dir / manifest["tree"]["file"])
        from memory_store.writer import tree_content_crc

        if tree_content_crc(tree) != manifest["tree"]["crc32c"]:
            raise BlockCorrupt(f"{dir}: tree.safetensors does not match its crc32c in the manifest")
        bank = cls(dir, manifest, tree, readahead, mapped_budget_bytes)
        if dir != given and is_version_root(given):
            bank.root = given
        log.debug("opened bank %s at %s", bank.bank_id[:12], dir)
        return bank

    # --- compatibility ------------------------------------------------------------------------
    def check_anchor(self, anchor: AnchorIdentity | dict) -> None:
        """Raise BankMismatch unless the bank was built for this anchor (architecture and hash)."""
        got = AnchorIdentity.model_validate(anchor if isinstance(anchor, dict) else anchor.model_dump())
        if got != self.anchor:
            raise BankMismatch(f"bank {self.bank_id[:12]} at {self.dir} was built for anchor "
                               f"{self.anchor.arch} ({self.anchor.hash[:16]}), not {got.arch} ({got.hash[:16]})")

    def check_embedder(self, name: str, dim: int) -> None:
        """Raise BankMismatch unless the tree was built in this embedder's space."""
        if (name, dim) != (self.spec.embedder_name, self.spec.embedder_dim):
            raise BankMismatch(f"bank {self.bank_id[:12]} routes with {self.spec.embedder_name} "
                               f"({self.spec.embedder_dim}-d), not {name} ({dim}-d)")

    def check_bank_id(self, bank_id: str) -> None:
        if bank_id != self.bank_id:
            raise BankMismatch(f"bank_id {bank_id[:12]} does not match {self.bank_id[:12]} at {self.dir}")

    # --- layout -------------------------------------------------------------------------------
    def _ref(self, ref) -> NodeRef:
        return layout.check_ref_in(self.spec, ref)

    def shards_of(self, ref) -> list[str]:
        """Every shard that stores the node (several only for nodes above the shard level)."""
        ref = self._ref(ref)
        sl = self.spec.shard_level
        if ref.level >= sl:
            return [self.shard_ids[self._owner[self.tree.ancestor(ref.level, ref.index, sl)]]]
        below = self.tree.descendants(ref, sl)
        return [self.shard_ids[p] for p in np.unique(self._owner[below.start:below.stop])]

    def shard_of(self, ref) -> str:
        """The shard that stores the node (the first of them for nodes above the shard level)."""
        return self.shards_of(ref)[0]

    def owned_subtrees(self, shard_id: str) -> list[NodeRef]:
        """The shard-level nodes whose subtrees the shard owns."""
        if shard_id not in self._subtrees:
            raise NodeNotFound(f"no shard {shard_id!r} in bank {self.bank_id[:12]} (shards {self.shard_ids})")
        a, b = self._subtrees[shard_id]
        return [NodeRef(self.spec.shard_level, i) for i in range(a, b)]

    def block_info(self, ref) -> BlockInfo:
        ref = self._ref(ref)
        return BlockInfo(self.spec.block_shape(ref.level), self.spec.dtype, self.spec.bytes_per_block(ref.level),
                         int(self._crc[ref.level][ref.index]), bool(self._present[ref.level][ref.index]))

    def is_present(self, ref) -> bool:
        ref = self._ref(ref)
        return bool(self._present[ref.level][ref.index])

    def is_deleted(self, ref) -> bool:
        """Whether the node has no block in this bank (deleted, or never written): not an outage."""
        return not self.is_present(ref)

    def present_prefix(self, path) -> list[int]:
        """The longest prefix of a routed path (one index per level) whose nodes all have blocks.

        A deleted subtree is not an outage: a request routed into it is served with the levels above it,
        whatever router produced the path."""
        out: list[int] = []
        for level, index in enumerate(path, start=1):
            if level > self.spec.depth or not self._present[level][int(index)]:
                break
            out.append(int(index))
        return out

    def pin_shard(self, shard_id: str) -> None:
        """Map every level file of a shard now, so later reads use these inodes whatever happens to the
        paths (a process serving a shard keeps exactly the files of the version it opened)."""
        for level in range(1, self.spec.depth + 1):
            self._file(shard_id, level)

    # --- reads --------------------------------------------------------------------------------
    def _file(self, shard_id: str, level: int) -> MappedFile:
        key = (shard_id, level)
        f = self._files.get(key)
        if f is None:
            with self._lock:
                f = self._files.get(key)
                if f is None:
                    path = self.dir / layout.level_file(shard_id, level)
                    if not path.is_file():
                        raise NodeNotFound(f"shard file {path} is missing")
                    f = self._files[key] = MappedFile(path)
        return f

    def read_block_bytes(self, ref, verify: bool = True, shard: str | None = None) -> memoryview:
        """Zero-copy view of a block's bytes in the memory-mapped shard file.

        Raises NodeNotFound for absent (deleted) nodes or a shard that does not hold the node, and
        BlockCorrupt when the bytes do not match the manifest's crc32c (checked when `verify`)."""
        ref = self._ref(ref)
        if not self._present[ref.level][ref.index]:
            raise NodeNotFound(f"node {ref} is absent from bank {self.bank_id[:12]} (deleted or never written)")
        holders = self.shards_of(ref)
        if shard is None:
            shard = holders[0]
        elif shard not in holders:
            raise NodeNotFound(f"node {ref} is not stored in shard {shard!r} (it is in {holders})")
        f = self._file(shard, ref.level)
        name = layout.tensor_name(ref.index)
        if name not in f:
            raise NodeNotFound(f"node {ref} is missing from {f.path}")
        if self.mapped_budget_bytes:
            self._account(self.spec.bytes_per_block(ref.level))
        view = f.view(name, willneed=self.readahead)
        if verify:
            got, want = crc32c(view), int(self._crc[ref.level][ref.index])
            if got != want:
                raise BlockCorrupt(f"node {ref} in {f.path}: crc32c {got:#010x} != manifest {want:#010x}")
        return view

    def _account(self, nbytes: int) -> None:
        with self._lock:
            self._touched += nbytes
            if self._touched <= self.mapped_budget_bytes:
                return
            self._touched = nbytes
            files = list(self._files.values())
        for f in files:
            f.release()

    def read_block(self, ref, verify: bool = True, packed: bool = False):
        """The block as a torch tensor `[L_mem, 3, r_l, d]` in the bank dtype (a copy); an int8 bank's block
        dequantized to float32, or with `packed` as stored (`[L_mem, 3, r_l, d + 4]` int8)."""
        ref = self._ref(ref)
        return bytes_to_tensor(self.read_block_bytes(ref, verify), self.spec.dtype, self.spec.block_shape(ref.level),
                               packed=packed)

    def generic_block(self, verify: bool = True, packed: bool = False):
        """The generic memory `[L_mem, 3, sum(ranks), d]`, or None when the bank has none (`packed`: an int8
        bank's as stored, see `read_block`)."""
        g = self.manifest.get("generic")
        if not g:
            return None
        f = MappedFile(self.dir / g["file"])
        try:
            view = f.view("generic")
            if verify and crc32c(view) != g["crc32c"]:
                raise BlockCorrupt(f"{f.path}: generic memory does not match its crc32c")
            out = bytes_to_tensor(view, self.spec.dtype, self.spec.generic_shape, packed=packed)
            del view
        finally:
            f.close()
        return out

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bank({str(self.dir)!r}, bank_id={self.bank_id[:12]}, shards={self.shard_ids})"
