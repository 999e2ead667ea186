"""`hiermem bank update`: add and remove documents of a trained bank without a rebuild.

A memory tree is made for local updates: a document is trained into one leaf's block (and the blocks above it,
which its whole subtree shares). The update

1. reads the bank's documents (``documents.jsonl``, each with the path it was trained into) and the settings
   that trained them (``training.json``), both written beside the blocks by the trainer;
2. drops the documents named by ``--remove`` (an id, or a source file: every passage of it) and reads the
   files of ``--add`` into passages (training/ingest.py); a file added again replaces its earlier passages;
3. puts each new passage in a leaf: the leaf of the documents it shares a name with (the grouping the
   build uses, `routing.group_documents`) when those are in the bank, else the leaf its group's mean
   embedding descends to in the bank's tree;
4. retrains the blocks of the leaves whose documents changed, from a fresh start, on every document those
   leaves now hold, with the bank's settings; every other block -- the level-1 blocks included -- is frozen
   at the bank's values, so every leaf that got no new passage keeps its block byte for byte; a leaf left
   without documents gets a zero block (which changes nothing);
5. rebuilds the nearest-document router over the documents and calibrates its gate (training/routing.py);
6. writes the next bank with `memory_store.ops.rewrite_bank` -- shard files without a changed leaf
   hard-linked, other blocks copied with their checksums verified, the new leaf blocks, the router, the
   documents -- as the next version of a versioned root (``current`` moved: a running stack follows it,
   docs/operating.md) or to ``--out``.

A removed passage's text, its words and its index entries are in no file of the new version and its leaf is
retrained without it. Its level-1 block is not retrained: that block is shared by the subtree's other leaves,
and retraining it would change their facts too. The gate no longer finds the passage, so prompts about it get
no memory and are answered by the anchor alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memory_store.layout import DOCUMENTS_FILE, TRAINING_FILE

log = logging.getLogger(__name__)


class UpdateError(ValueError):
    """An update that cannot be made as asked; nothing was written."""


@dataclass
class UpdatePlan:
    """What an update changes: the new version's documents (each with its "path") and the leaves to retrain."""

    docs: list[dict]
    changed_leaves: set[tuple[int, ...]]
    shrunk_leaves: set[tuple[int, ...]] = field(default_factory=set)  # changed leaves that lost documents
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def bank_documents(bank_dir: Path) -> tuple[list[dict], dict]:
    """(documents with their paths, training settings) a bank carries."""
    from training.corpus import read_jsonl

    docs_file, settings_file = bank_dir / DOCUMENTS_FILE, bank_dir / TRAINING_FILE
    if not docs_file.exists() or not settings_file.exists():
        raise UpdateError(f"{bank_dir} carries no {DOCUMENTS_FILE} / {TRAINING_FILE}: it was exported before banks "
                          "kept the documents they were trained on; build it again (hiermem build / train) to update it")
    return read_jsonl(docs_file), json.loads(settings_file.read_text())


def removed_indices(docs: list[dict], remove: list[str]) -> set[int]:
    """Indices of the documents named by id or by source file; an unknown name is an error (nothing changes)."""
    out: set[int] = set()
    unknown = []
    for name in remove:
        hit = {i for i, d in enumerate(docs) if d["id"] == name or d.get("source") == name}
        if not hit:
            unknown.append(name)
        out |= hit
    if unknown:
        raise UpdateError(f"--remove: no document of the bank has the id or source {', '.join(map(repr, unknown))} "
                          f"(the bank's {DOCUMENTS_FILE} lists them)")
    return out


def place_new(tree, kept: list[dict], new: list[dict], embed_fn) -> np.ndarray:
    """A path per new document: the most common path of the kept documents in its name group, else the route
    of its group's mean embedding down the tree (`routing.group_paths`, as in a build)."""
    from training.routing import doc_route_texts, group_documents, group_paths

    groups = group_documents([d["text"] for d in kept + new])
    new_groups = np.unique(groups[len(kept):], return_inverse=True)[1]
    paths = group_paths(tree, embed_fn(doc_route_texts(new)), new_groups)
    for g in np.unique(groups[len(kept):]):
        held = [tuple(kept[i]["path"]) for i in range(len(kept)) if groups[i] == g]
        if held:
            paths[groups[len(kept):] == g] = Counter(held).most_common(1)[0][0]
    return paths


def same_sources(docs: list[dict], add: list[dict]) -> list[dict]:
    """The added passages, a file given on its own renamed to the bank's source it is (`notes/a.md` for `a.md`,
    when exactly one bank source ends so): a file built as part of a folder and edited is then replaced, not
    added beside its old passages."""
    known: set[str] = {d["source"] for d in docs if d.get("source")}
    rename: dict[str, str] = {}
    for src in {p["source"] for p in add if p.get("source")} - known:
        match = [k for k in known if k.endswith("/" + src)]
        if len(match) == 1:
            rename[src] = match[0]
    out = []
    for p in add:
        src = p.get("source") or ""
        if src in rename:
            ident = str(p["id"])
            p = {**p, "source": rename[src], "id": rename[src] + ident[len(src):] if ident.startswith(src) else ident}
        out.append(p)
    return out


def plan_update(docs: list[dict], tree, add: list[dict], remove: list[str], embed_fn) -> UpdatePlan:
    """The new version's documents and the leaves whose documents changed."""
    gone = removed_indices(docs, remove)
    add = same_sources(docs, add)
    sources = {p.get("source") for p in add} - {None}
    replaced = {i for i, d in enumerate(docs) if d.get("source") in sources and i not in gone}
    known = {d["id"] for i, d in enumerate(docs) if i not in gone | replaced}
    dup = [p["id"] for p in add if p["id"] in known]
    if dup:
        raise UpdateError(f"--add: the bank already holds {', '.join(map(repr, dup[:5]))} from another source; "
                          "remove it first or rename the file")
    drop = gone | replaced
    kept = [d for i, d in enumerate(docs) if i not in drop]
    paths = place_new(tree, kept, add, embed_fn) if add else np.zeros((0, len(tree.branching)), dtype=np.int64)
    new = [{**d, "path": [int(x) for x in p]} for d, p in zip(add, paths, strict=True)]
    shrunk = {tuple(docs[i]["path"]) for i in drop}
    return UpdatePlan(docs=kept + new, changed_leaves=shrunk | {tuple(d["path"]) for d in new}, shrunk_leaves=shrunk,
                      added=[d["id"] for d in new],
                      removed=[docs[i]["id"] for i in sorted(drop)])


def retrain_leaves(bank, plan: UpdatePlan, settings: dict, work: Path, epochs: int | None = None,
                   progress: bool = True, only_new: bool = False) -> tuple[dict, dict]:
    """Train the changed leaves' blocks on their documents, every other block frozen at the bank's values.
    With `only_new`, a leaf that lost no document starts from its block and trains on its new documents
    alone (a leaf that lost one is always trained afresh on what it keeps). Returns ({leaf key: block},
    the training job's info)."""
    import torch
    from safetensors.torch import load_file

    from memory_store import NodeRef
    from training.config import TrainConfig
    from training.corpus import Corpus
    from training.routing import embed, get_embedder
    from training.trainable_bank import TrainableBank
    from training.trainer import Trainer

    depth = bank.spec.depth
    new = set(plan.added)
    warm = plan.changed_leaves - plan.shrunk_leaves if only_new else set()
    rows = [d for d in plan.docs if tuple(d["path"]) in plan.changed_leaves
            and (tuple(d["path"]) not in warm or d["id"] in new)]
    if not rows:
        return {}, {}
    job = work / "job"
    job.mkdir(parents=True)
    keep = ("id", "text", "route_text", "source")
    Corpus(docs=[{k: d[k] for k in keep if k in d} for d in rows]).save(work / "corpus")
    bank.tree.save(job / "tree.safetensors")
    np.save(job / "doc_paths.npy", np.asarray([d["path"] for d in rows], dtype=np.int64))
    np.save(job / "doc_emb.npy", embed([d.get("route_text") or d["text"] for d in rows],
                                       get_embedder(settings.get("embedder", bank.spec.embedder_name))))
    cfg = TrainConfig(**{**settings, "corpus": str(work / "corpus"), "out": str(job), "generic_prob": 0.0,
                         "shared_prob": 0.0, "memory_scale": "1", "progress": progress,
                         **({"epochs": epochs} if epochs else {})})
    trainer = Trainer(cfg)
    trainable = {TrainableBank.key(depth, p[-1]) for p in plan.changed_leaves}
    frozen = {TrainableBank.key(level, int(i)) for p in plan.changed_leaves for level, i in enumerate(p[:-1], 1)}
    frozen |= {TrainableBank.key(depth, p[-1]) for p in warm}  # their starting values
    values = {k: bank.read_block(NodeRef(*map(int, k.split("_")))).to(torch.float32) for k in frozen}
    trainer.memory.freeze(values, trainable)
    info = trainer.train()
    blocks = load_file(str(job / "memory.safetensors"))
    return {k: blocks[k] for k in trainable}, info


def update_bank(bank_path: str | Path, add: list[str] | None = None, remove: list[str] | None = None,
                out: str | Path | None = None, work: str | Path | None = None, epochs: int | None = None,
                progress: bool = True, only_new: bool = False) -> dict:
    """Apply an update to the bank at `bank_path` (a versioned root, unless `out` is given). Returns a summary."""
    import torch

    from memory_store import Bank, NodeRef
    from memory_store.bank import is_version_root
    from memory_store.ops import rewrite_bank
    from training.corpus import write_jsonl
    from training.routing import embed, get_embedder, make_router

    bank_path = Path(bank_path)
    if out is None and not is_version_root(bank_path):
        raise UpdateError(f"{bank_path} is not a versioned bank root: pass --out NEW, or make one once with "
                          "`hiermem bank init-root` (a served bank directory is never rewritten in place)")
    if not add and not remove:
        raise UpdateError("nothing to update: give --add PATH... and/or --remove ID...")
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    with Bank.open(bank_path) as bank:
        docs, settings = bank_documents(bank.dir)
        embedder = get_embedder(settings.get("embedder", bank.spec.embedder_name))
        passages = []
        if add:
            from lm import load_anchor
            from training.ingest import read_passages

            passages = read_passages(add, tokenizer=load_anchor(settings["anchor"]).tokenizer)
        t0 = time.perf_counter()
        plan = plan_update(docs, bank.tree, passages, list(remove or []), lambda xs: embed(xs, embedder))
        seconds["plan"] = time.perf_counter() - t0
        log.info("update: %d documents added, %d removed; %d leaves to retrain", len(plan.added), len(plan.removed),
                 len(plan.changed_leaves))
        work = Path(work) if work else bank_path.parent / f".update-{bank_path.name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        blocks, info = retrain_leaves(bank, plan, settings, work, epochs, progress, only_new)
        seconds["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        paths = np.asarray([d["path"] for d in plan.docs], dtype=np.int64).reshape(len(plan.docs), bank.spec.depth)
        router = make_router(plan.docs, paths, embedder, probes=[],
                             max_false_open=float(settings.get("gate_max_false_open", 0.02)))
        (work / "router").mkdir()
        router.save(work / "router")
        seconds["router"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_jsonl(work / "router" / DOCUMENTS_FILE, plan.docs)
        shutil.copyfile(bank.dir / TRAINING_FILE, work / "router" / TRAINING_FILE)
        depth = bank.spec.depth
        leaves = {NodeRef(depth, p[-1]) for p in plan.changed_leaves}
        replace = {r: blocks.get(f"{r.level}_{r.index}", torch.zeros(bank.spec.block_shape(depth))) for r in leaves}
        # untouched shard files are hard-linked, every other block copied with its checksum verified
        bank_id = rewrite_bank(bank_path, out, replace=replace, documents_from=work / "router")
        target = Path(out) if out is not None else bank_path
        seconds["export"] = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t_all
    return {"bank_id": bank_id, "bank": str(target), "added": plan.added, "removed": plan.removed,
            "changed_leaves": sorted(list(p) for p in plan.changed_leaves), "documents": len(plan.docs),
            "trained_documents": info.get("n_docs", 0),
            "steps": info.get("steps", 0), "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def run_update_command(args) -> int:
    try:
        summary = update_bank(args.bank, add=args.add, remove=args.remove, out=args.out, work=args.work,
                              epochs=args.epochs, progress=not args.no_progress, only_new=args.only_new)
    except ValueError as exc:  # UpdateError, IngestError: what the user asked for or gave
        raise SystemExit(f"hiermem bank update: {exc}") from None
    print(json.dumps({k: v for k, v in summary.items() if k not in ("added", "removed")}
                     | {"added": len(summary["added"]), "removed": len(summary["removed"])}, indent=2))
    return 0
