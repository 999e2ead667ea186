"""Whole-bank operations: verify, reshard, delete/zero subtrees, inspect. Each rewrites through
BankWriter (streaming, atomic), so an interrupted operation leaves the old bank as it was."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory_store.bank import Bank
from memory_store.errors import BankError, BlockCorrupt
from memory_store.spec import NodeRef
from memory_store.writer import BankWriter

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


def rewrite_bank(src: str | Path, out: str | Path | None = None, *, n_shards: int | None = None,
                 delete: Iterable[NodeRef] = (), zero: Iterable[NodeRef] = (), progress: bool = False) -> str:
    """Copy a bank block by block (verifying every block), optionally to another shard count, with
    subtrees deleted (absent) or zeroed. `out=None` replaces `src` atomically. Returns the new bank_id."""
    bank = Bank.open(src, mapped_budget_bytes=_COPY_BUDGET)
    dst = Path(out) if out is not None else Path(src)
    n_shards = n_shards or len(bank.shard_ids)
    gone = _subtree_sets(bank, delete)
    zeroed = _subtree_sets(bank, zero)
    refs = list(_all_refs(bank))
    it = refs
    if progress:
        from tqdm import tqdm

        it = tqdm(refs, desc="rewrite", unit="block")
    generic = bank.generic_block()
    changed = {lv: gone.get(lv, set()) | zeroed.get(lv, set()) for lv in range(1, bank.spec.depth + 1)}
    with BankWriter(dst, bank.spec, bank.anchor, bank.tree, n_shards, overwrite=out is None) as w:
        if n_shards == len(bank.shard_ids):
            _link_untouched(bank, w, changed)
        for ref in it:
            holders = w.holders(ref)
            if all(w.is_linked(sid, ref.level) for sid in holders):
                continue
            if ref.index in gone.get(ref.level, ()) or not bank.is_present(ref):
                w.mark_absent(ref)
            elif ref.index in zeroed.get(ref.level, ()):
                data = bytes(bank.spec.bytes_per_block(ref.level))
                w.write_block_bytes(ref, data)
            else:
                view = bank.read_block_bytes(ref, verify=True)
                w.write_block_bytes(ref, view, crc=bank.block_info(ref).crc32c)
                del view
        if generic is not None:
            w.write_generic(generic)
    bank.close()
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
        "fetched_params": spec.fetched_params, "fetched_bytes": spec.fetched_params * spec.bytes_per_param,
        "bank_params": spec.bank_params, "bank_bytes": spec.bank_bytes,
        "shards": [{"id": sid, "owned_subtrees": [str(r) for r in bank.owned_subtrees(sid)]}
                   for sid in bank.shard_ids],
        "generic": bank.manifest.get("generic") is not None,
    }
