"""Whole-bank operations: verify, reshard, delete/zero subtrees, inspect, and bank versions.

Each rewrite goes through BankWriter (streaming, atomic) into a *new* directory: a bank directory that
may be served is never modified. Give `out=` (the operator's choice of directory), or operate on a
versioned root (`init_version_root`): the result becomes `versions/<name>/` and `current` is re-pointed
at it, so processes started from then on serve it while running ones keep the version they opened."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory_store import layout
from memory_store.bank import CURRENT, VERSIONS, Bank, is_version_root, resolve_bank_dir
from memory_store.errors import BankError, BlockCorrupt
from memory_store.router import DocRouter
from memory_store.spec import BankSpec, NodeRef
from memory_store.writer import BankWriter, _fsync_dir

log = logging.getLogger(__name__)

# Whole-bank passes touch every block once: keep few of them mapped (RSS) at a time.
_COPY_BUDGET = 256 << 20


@dataclass
class VerifyReport:
    bank_id: str
    blocks_checked: int = 0
    bytes_checked: int = 0
    absent: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _all_refs(bank: Bank) -> Iterable[NodeRef]:
    for level in range(1, bank.spec.depth + 1):
        for index in range(bank.spec.nodes_at(level)):
            yield NodeRef(level, index)


def verify_bank(dir: str | Path, progress: bool = False) -> VerifyReport:
    """Check every stored copy of every present block (and the generic memory) against its crc32c."""
    try:
        bank = Bank.open(dir, mapped_budget_bytes=_COPY_BUDGET)
    except BlockCorrupt as exc:  # the tree does not match the manifest: nothing else can be trusted
        return VerifyReport(bank_id="?", problems=[str(exc)])
    report = VerifyReport(bank.bank_id)
    refs = list(_all_refs(bank))
    it = refs
    if progress:
        from tqdm import tqdm

        it = tqdm(refs, desc="verify", unit="block")
    for ref in it:
        if not bank.is_present(ref):
            report.absent += 1
            continue
        for sid in bank.shards_of(ref):
            try:
                view = bank.read_block_bytes(ref, verify=True, shard=sid)
                report.bytes_checked += len(view)
                report.blocks_checked += 1
                del view
            except BankError as exc:  # corrupt block, missing or truncated file
                report.problems.append(f"shard {sid}: {exc}")
    try:
        bank.generic_block(verify=True)
    except BankError as exc:
        report.problems.append(str(exc))
    bank.close()
    return report


def _subtree_sets(bank: Bank, refs: Iterable[NodeRef]) -> dict[int, set[int]]:
    """Every node (per level) in the subtrees rooted at refs."""
    out: dict[int, set[int]] = {}
    for ref in refs:
        ref = bank.spec.check_ref(ref)
        for level in range(ref.level, bank.spec.depth + 1):
            out.setdefault(level, set()).update(bank.tree.descendants(ref, level))
    return out


# --- versions ------------------------------------------------------------------------------------


def _version_name(root: Path, bank_id: str) -> str:
    """`v<seq>-<UTC time>-<bank_id[:12]>`: sorts in the order the versions were made."""
    seqs = [int(d.name[1:5]) for d in (root / VERSIONS).iterdir() if d.name[:1] == "v" and d.name[1:5].isdigit()]
    seq = max(seqs, default=0) + 1
    return f"v{seq:04d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{bank_id[:12]}"


def use_version(root: str | Path, name: str) -> None:
    """Point `root/current` at `versions/<name>` atomically (symlink + rename): what processes started
    from now on open. Also the roll-back: point it at an older version."""
    root = Path(root)
    target = root / VERSIONS / name
    if not (target / layout.MANIFEST).is_file():
        raise BankError(f"{target} is not a bank version")
    tmp = root / f".{CURRENT}-{secrets.token_hex(4)}"
    os.symlink(f"{VERSIONS}/{name}", tmp)
    os.replace(tmp, root / CURRENT)
    _fsync_dir(root)
    log.info("%s/%s -> %s", root, CURRENT, target)


def _adopt_version(root: Path, built: Path, bank_id: str) -> str:
    """Rename a freshly written bank (not served by anyone yet) to its version name; point current at it."""
    name = _version_name(root, bank_id)
    os.rename(built, root / VERSIONS / name)
    _fsync_dir(root / VERSIONS)
    use_version(root, name)
    return name


def init_version_root(src: str | Path, root: str | Path) -> str:
    """Make a versioned root at `root` whose first version is a copy of the bank at `src` (files hard-
    linked: bank files are never modified in place, so sharing inodes is safe). Returns the version name."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise BankError(f"{root} exists and is not empty")
    (root / VERSIONS).mkdir(parents=True, exist_ok=True)
    return add_version(src, root)


def add_version(src: str | Path, root: str | Path) -> str:
    """Publish the bank at `src` (e.g. a retrained or merged bank) as the next version of a versioned root
    and point `current` at it; `src` is hard-linked, not moved. Returns the version name."""
    src_dir, root = resolve_bank_dir(src), Path(root)
    bank = Bank.open(src_dir)
    if not (root / VERSIONS).is_dir():
        raise BankError(f"{root} is not a versioned bank root (make one with init-root)")
    current = Bank.open(root) if is_version_root(root) else None
    if current is not None:
        current.check_anchor(bank.anchor)
        current.check_embedder(bank.spec.embedder_name, bank.spec.embedder_dim)
    tmp = root / VERSIONS / f".new-{secrets.token_hex(4)}"
    for dirpath, _dirs, files in os.walk(src_dir):
        rel = Path(dirpath).relative_to(src_dir)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(Path(dirpath) / f, tmp / rel / f)
            except OSError:
                shutil.copyfile(Path(dirpath) / f, tmp / rel / f)
    return _adopt_version(root, tmp, bank.bank_id)


def list_versions(root: str | Path) -> list[dict[str, Any]]:
    """The versions of a versioned root, oldest first: name, bank_id, shards, and which one is current."""
    root = Path(root)
    current = (root / CURRENT).resolve().name if (root / CURRENT).is_symlink() else None
    out = []
    for d in sorted((root / VERSIONS).iterdir()) if (root / VERSIONS).is_dir() else []:
        if d.name.startswith(".") or not (d / layout.MANIFEST).is_file():
            continue
        try:
            bank = Bank.open(d)
        except BankError as exc:
            log.warning("skipping %s: %s", d, exc)
            continue
        out.append({"name": d.name, "bank_id": bank.bank_id, "shards": len(bank.shard_ids),
                    "deleted": [str(r) for r in bank.deleted_roots], "current": d.name == current})
    return out


def rewrite_bank(src: str | Path, out: str | Path | None = None, *, n_shards: int | None = None,
                 delete: Iterable[NodeRef] = (), zero: Iterable[NodeRef] = (), replace: Mapping[NodeRef, Any] | None = None,
                 documents_from: str | Path | None = None, dtype: str | None = None, progress: bool = False) -> str:
    """Copy a bank block by block (verifying every block), optionally to another shard count, with
    subtrees deleted (absent) or zeroed and single blocks replaced (`replace`: node -> array in the block's
    shape, e.g. retrained leaves), into a new directory: `out`, or with `out=None` and `src` a versioned root,
    a new version that `current` then points at. Shard files holding no changed node are hard-linked. The
    router and the documents the blocks were trained on come from `src`, or from `documents_from` when the
    documents changed. `dtype`: store the copy's blocks in another dtype (e.g. "int8", quantized row by row,
    memory_store/quant.py): every block is read as values and written again, a new bank_id. A plain bank
    directory is never rewritten in place (shards may be serving it). Returns the new bank_id."""
    root = Path(src) if is_version_root(src) else None
    if out is None and root is None:
        raise BankError(f"{src} is a plain bank directory that running shards may serve: it is never "
                        "rewritten in place. Write the result elsewhere (--out NEW, then roll the replicas "
                        "to NEW), or make a versioned root once (hiermem bank init-root --bank "
                        f"{src} --root ROOT) and operate on ROOT")
    bank = Bank.open(src, mapped_budget_bytes=_COPY_BUDGET)
    if out is not None:
        dst = Path(out)
        if dst.exists() and (resolve_bank_dir(dst) == bank.dir or dst.resolve() == bank.dir):
            raise BankError(f"--out {out} is the source bank itself: it is never rewritten in place")
    else:
        assert root is not None
        dst = root / VERSIONS / f".new-{secrets.token_hex(4)}"
    n_shards = n_shards or len(bank.shard_ids)
    spec = bank.spec
    convert = dtype is not None and dtype != spec.dtype
    if convert:
        spec = BankSpec(**{**spec.model_dump(), "dtype": dtype})
    gone = _subtree_sets(bank, delete)
    zeroed = _subtree_sets(bank, zero)
    refs = list(_all_refs(bank))
    it = refs
    if progress:
        from tqdm import tqdm

        it = tqdm(refs, desc="rewrite", unit="block")
    # as stored when the dtype stays (an int8 bank's copied byte for byte, not quantized again), as values when
    # it changes (written again in the new dtype)
    generic = bank.generic_block(packed=not convert)
    replace = {bank.spec.check_ref(r): a for r, a in (replace or {}).items()}
    changed = {lv: gone.get(lv, set()) | zeroed.get(lv, set()) | {r.index for r in replace if r.level == lv}
               for lv in range(1, bank.spec.depth + 1)}
    with BankWriter(dst, spec, bank.anchor, bank.tree, n_shards) as w:
        w.deleted = set(bank.deleted_roots) | {bank.spec.check_ref(r) for r in delete}
        # the generic memory is copied as it is: trained before these deletions, it may hold what they held
        w.generic_predates_deletions = bool(list(delete)) or bool(
            (bank.manifest.get("generic") or {}).get("predates_deletions"))
        if n_shards == len(bank.shard_ids) and not convert:
            _link_untouched(bank, w, changed)
        for ref in it:
            holders = w.holders(ref)
            if all(w.is_linked(sid, ref.level) for sid in holders):
                continue
            if ref.index in gone.get(ref.level, ()) or not bank.is_present(ref):
                w.mark_absent(ref)
            elif ref.index in zeroed.get(ref.level, ()):
                w.write_block_bytes(ref, bytes(spec.bytes_per_block(ref.level)))  # zeros in every dtype
            elif ref in replace:
                w.write_block(ref, replace[ref])
            elif convert:
                w.write_block(ref, bank.read_block(ref, verify=True).float())
            else:
                view = bank.read_block_bytes(ref, verify=True)
                w.write_block_bytes(ref, view, crc=bank.block_info(ref).crc32c)
                del view
        if generic is not None:
            w.write_generic(generic)
        # the nearest-document router goes with the blocks (routes into deleted subtrees stop at the
        # deepest present level, Bank.present_prefix)
        carried = Path(documents_from) if documents_from is not None else bank.dir
        DocRouter.copy_files(carried, w.tmp)
        for name in (layout.DOCUMENTS_FILE, layout.TRAINING_FILE):  # the documents the blocks were trained on
            if (carried / name).exists():
                shutil.copyfile(carried / name, w.tmp / name)
    bank.close()
    if root is not None and out is None:
        name = _adopt_version(root, dst, w.bank_id)
        log.info("new version %s of %s (bank_id %s): processes started from now on serve it; roll the "
                 "running replicas one by one (docs/operating.md)", name, root, w.bank_id[:12])
    return w.bank_id


def _link_untouched(bank: Bank, w: BankWriter, changed: dict[int, set[int]]) -> None:
    """Hard-link the shard files that hold none of the changed nodes (same shard cut as the source)."""
    from memory_store import layout

    for sid in bank.shard_ids:
        sub = tuple(bank.manifest["shards"][bank.shard_ids.index(sid)]["subtrees"])
        for level in range(1, bank.spec.depth + 1):
            nodes = layout.nodes_in_shard(bank.spec, sub, level)
            if any(i in nodes for i in changed[level]):
                continue
            blocks = bank.manifest["blocks"][str(level)]
            if w.link_file(sid, level, bank.dir / layout.level_file(sid, level), blocks["crc32c"],
                           blocks["present"]):
                log.debug("linked shard %s level %d unchanged", sid, level)


def reshard(src: str | Path, n_shards: int, out: str | Path | None = None, progress: bool = False) -> str:
    """Rewrite the bank's shard files for another shard count; bank_id stays (contents are the same)."""
    return rewrite_bank(src, out, n_shards=n_shards, progress=progress)


def delete_subtrees(dir: str | Path, refs: Iterable[NodeRef], *, zero: bool = False,
                    out: str | Path | None = None, progress: bool = False) -> str:
    """Remove (or, with zero=True, zero) the blocks of the subtrees rooted at refs and re-publish the bank
    (a new bank_id, since the contents changed). Readers then raise NodeNotFound for removed nodes."""
    refs = [NodeRef(*r) for r in refs]
    if zero:
        return rewrite_bank(dir, out, zero=refs, progress=progress)
    return rewrite_bank(dir, out, delete=refs, progress=progress)


def inspect_bank(dir: str | Path) -> dict[str, Any]:
    """A summary of a bank for humans and scripts."""
    bank = Bank.open(dir)
    spec = bank.spec
    levels = []
    for level in range(1, spec.depth + 1):
        n = spec.nodes_at(level)
        present = int(sum(bank.is_present(NodeRef(level, i)) for i in range(n)))
        levels.append({"level": level, "nodes": n, "present": present, "rank": spec.ranks[level - 1],
                       "block_shape": list(spec.block_shape(level)), "block_bytes": spec.bytes_per_block(level),
                       "level_bytes": spec.bytes_per_block(level) * n})
    return {
        "dir": str(bank.dir), "bank_id": bank.bank_id, "anchor": bank.anchor.model_dump(),
        "spec": spec.model_dump(mode="json"), "levels": levels,
        "fetched_params": spec.fetched_params, "fetched_bytes": spec.fetched_bytes,
        "bank_params": spec.bank_params, "bank_bytes": spec.bank_bytes,
        "shards": [{"id": sid, "owned_subtrees": [str(r) for r in bank.owned_subtrees(sid)]}
                   for sid in bank.shard_ids],
        "generic": bank.manifest.get("generic") is not None,
        "deleted": [str(r) for r in bank.deleted_roots],
        "generic_predates_deletions": bool((bank.manifest.get("generic") or {}).get("predates_deletions")),
        "version": bank.dir.name if bank.root is not None else None,
    }
