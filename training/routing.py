"""Embedding documents and prompts, building the cluster tree, and the routing-agreement study.

What gets embedded (the choice the issue asks us to make and measure):

* a document is embedded by its ``route_text`` when the corpus gives one, else by its ``text``;
* a prompt is embedded as it is.

The built-in facts corpus sets ``route_text`` to the entity-bearing part of the document (the sentence
without its object, e.g. "The city of Kisumu is in the country of"), so the document lands where a question
about its entity lands. Embedding whole documents ("... of Kenya.") moves them toward their answer and
away from the prompt: measured here, only about half of the probes then reach their document's leaf.
``routing_agreement`` measures both, on the probe prompts and on paraphrased prompts.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


PARAPHRASES = {
    "city_country": "{e} is a city located in the country of",
    "us_city_state": "{e} is a city located in the US state of",
    "country_capital": "What is the capital city of {e}? The capital city is",
    "element_number": "How many protons does {e} have? The atomic number is",
}
"""A second wording per relation, never used for training: routing must hold for prompts we did not write."""


def get_embedder(name: str = "all-MiniLM-L6-v2"):
    """memory_store's embedder of that name (the model server routes prompts with the same one)."""
    from memory_store import load_embedder

    return load_embedder(name)


def embed(texts: Sequence[str], embedder=None) -> np.ndarray:
    """L2-normalised `[N, dim]` float32 embeddings."""
    emb = (embedder or get_embedder()).embed(list(texts))
    emb = np.asarray(emb, dtype=np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def doc_route_texts(docs: Sequence[dict]) -> list[str]:
    return [d.get("route_text") or d["text"] for d in docs]


def build_corpus_tree(doc_emb: np.ndarray, branching: Sequence[int], seed: int = 0):
    """Hierarchical k-means over the documents' embeddings (memory_store.build_tree)."""
    from memory_store.tree import build_tree

    return build_tree(doc_emb, list(branching), seed=seed)


def routing_agreement(tree, docs: Sequence[dict], probes: Sequence, doc_paths: np.ndarray,
                      embedder=None) -> dict:
    """How often a trained fact's prompt routes to the leaf (and level-1 node) of the document stating it.

    Args:
        tree: the tree documents were routed with.
        docs: the corpus documents; ``doc_paths[i]`` is the route of ``docs[i]``.
        probes: the corpus probes (only ``split == "train"`` ones with a ``doc_id`` count).
    Returns:
        ``{"prompt": {"leaf", "level1", "n"}, "paraphrase": {...}}``.
    """
    index = {d["id"]: i for i, d in enumerate(docs)}
    trained = [p for p in probes if p.split == "train" and p.doc_id in index]
    if not trained:
        return {}
    want = doc_paths[[index[p.doc_id] for p in trained]]
    out = {}
    variants = {"prompt": [p.prompt for p in trained]}
    para = [(i, PARAPHRASES[p.relation].format(e=p.entity)) for i, p in enumerate(trained)
            if p.relation in PARAPHRASES and p.entity]
    if para:
        variants["paraphrase"] = [t for _, t in para]
    for name, texts in variants.items():
        got = tree.route(embed(texts, embedder))
        ref = want if name == "prompt" else want[[i for i, _ in para]]
        out[name] = {"leaf": float(np.mean(np.all(got == ref, axis=1))),
                     "level1": float(np.mean(got[:, 0] == ref[:, 0])), "n": len(texts)}
    log.info("routing agreement: %s", out)
    return out


def agreement_study(docs: Sequence[dict], probes: Sequence, branching: Sequence[int], seed: int = 0,
                    embedder_name: str = "all-MiniLM-L6-v2") -> dict:
    """How often a trained fact's prompt reaches a leaf that a document stating the fact was trained in.

    * ``route_text`` / ``text``: the tree's greedy descent, documents embedded by their ``route_text`` (when
      the corpus gives one) or their whole text -- the routing before the document router;
    * ``router``: documents grouped by shared names into one leaf (`group_documents`), prompts routed
      through the nearest documents (memory_store.router), reported for the gate ignored (``reached``)
      and with the gate calibrated on the corpus's ``valid`` probes (``gated``: share of prompts it closes).
    Probes of every split that names documents (``doc_ids`` or ``doc_id``) are scored per split."""
    embedder = get_embedder(embedder_name)
    out: dict = {}
    if any(d.get("route_text") for d in docs):
        for name, texts in (("route_text", doc_route_texts(docs)), ("text", [d["text"] for d in docs])):
            emb = embed(texts, embedder)
            tree = build_corpus_tree(emb, branching, seed=seed)
            out[name] = routing_agreement(tree, docs, probes, tree.route(emb), embedder)
    emb = embed([d["text"] for d in docs], embedder)
    tree = build_corpus_tree(emb, branching, seed=seed)
    out["descent"] = _reach(lambda texts: [tuple(p) for p in tree.route(embed(texts, embedder)).tolist()],
                            docs, probes, tree.route(emb))
    paths = group_paths(tree, emb, group_documents([d["text"] for d in docs]))
    router = make_router(docs, paths, embedder, probes)

    def via_router(texts: list[str]) -> list[tuple[tuple[int, ...] | None, bool]]:
        e = embed(texts, embedder)
        return [(c[0].path if c else None, router.open(c[0].cos, c[0].idf) if c else False)
                for c in (router.candidates(x, t) for x, t in zip(e, texts, strict=True))]

    out["router"] = _reach(via_router, docs, probes, paths, gated=True)
    out["router"]["gate"] = router.calibration
    log.info("routing agreement: %s", out)
    return out


def _reach(route, docs: Sequence[dict], probes: Sequence, doc_paths: np.ndarray, gated: bool = False) -> dict:
    where = {d["id"]: tuple(int(x) for x in p) for d, p in zip(docs, doc_paths, strict=True)}
    out: dict = {}
    for split in sorted({p.split for p in probes}):
        rows = [p for p in probes if p.split == split and (getattr(p, "doc_ids", None) or p.doc_id)]
        if not rows:
            continue
        got = route([p.prompt for p in rows])
        hit, top, closed = [], [], []
        for p, g in zip(rows, got, strict=True):
            path, opened = g if gated else (g, True)
            want = {where[d] for d in (getattr(p, "doc_ids", None) or [p.doc_id]) if d in where}
            hit.append(path in want)
            top.append(path is not None and any(w[0] == path[0] for w in want))
            closed.append(not opened)
        out[split] = {"reached": float(np.mean(hit)), "level1": float(np.mean(top)), "n": len(rows)}
        if gated:
            out[split]["gated"] = float(np.mean(closed))
    return out


# ---- routing through the nearest documents (memory_store.router) --------------------------------------------

ROUTER_GROUP_MAX_DF = 4
"""Documents that share a name-like word found in at most this many documents are trained into one leaf."""
ROUTER_GROUP_MAX_SIZE = 8


def group_documents(texts: Sequence[str], max_df: int = ROUTER_GROUP_MAX_DF,
                    max_size: int = ROUTER_GROUP_MAX_SIZE) -> np.ndarray:
    """Group id per document: documents sharing a rare alphabetic word (a name) are put together, so that
    every wording of an entity's facts is trained into the same leaf (the tree's balancing alone would
    split an entity's documents across leaves). Union-find; a merge that would exceed `max_size` is skipped.
    """
    from memory_store.router import words

    per_doc = [{w for w in words(t) if w.isalpha()} for t in texts]
    holders: dict[str, list[int]] = {}
    for d, ws in enumerate(per_doc):
        for w in ws:
            holders.setdefault(w, []).append(d)
    parent = list(range(len(texts)))
    size = [1] * len(texts)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for w in sorted(holders, key=lambda w: (len(holders[w]), w)):  # rarest words first
        docs = holders[w]
        if not 2 <= len(docs) <= max_df:
            continue
        for d in docs[1:]:
            a, b = find(docs[0]), find(d)
            if a != b and size[a] + size[b] <= max_size:
                parent[b] = a
                size[a] += size[b]
    roots = [find(d) for d in range(len(texts))]
    _, group = np.unique(roots, return_inverse=True)
    return group.astype(np.int64)


def group_paths(tree, emb: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Every document's path = the route of its group's mean embedding (one leaf per group)."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    sums = np.zeros((n_groups, emb.shape[1]), dtype=np.float64)
    np.add.at(sums, groups, emb)
    means = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return tree.route(means)[groups]


def calibrate_gate(router, embedder, positives: Sequence[str], negatives: Sequence[str],
                   max_false_open: float = 0.02) -> dict:
    """Choose the router's gate thresholds on data: the most permissive (min_idf, min_cos) whose share of
    `negatives` (prompts the bank should leave alone) let through is at most `max_false_open`, maximising
    the share of `positives` (prompts about trained facts, in wordings not used for testing) let through.
    Sets them on `router` and returns the figures (stored in the router's `calibration`)."""
    def best(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 2))
        emb = embed(list(texts), embedder)
        rows = []
        for e, t in zip(emb, texts, strict=True):
            c = router.candidates(e, t)
            rows.append((c[0].idf, c[0].cos) if c else (0.0, -1.0))
        return np.asarray(rows, dtype=np.float64)

    pos, neg = best(positives), best(negatives)
    idf_grid = sorted({0.0, *np.round(pos[:, 0], 6).tolist()}) if len(pos) else [router.min_idf]
    cos_grid = [-1.0, *np.round(np.quantile(pos[:, 1], np.linspace(0, 0.3, 13)), 6).tolist()] if len(pos) else [0.0]
    choice = (router.min_idf, router.min_cos, -1.0, 1.0)
    for ti in idf_grid:
        for tc in cos_grid:
            tpr = float(np.mean((pos[:, 0] >= ti) & (pos[:, 1] >= tc))) if len(pos) else 0.0
            fpr = float(np.mean((neg[:, 0] >= ti) & (neg[:, 1] >= tc))) if len(neg) else 0.0
            if fpr <= max_false_open and (tpr, -fpr) > (choice[2], -choice[3]):
                choice = (ti, tc, tpr, fpr)
    if len(pos):
        router.min_idf, router.min_cos = float(choice[0]), float(choice[1])
    report = {"min_idf": router.min_idf, "min_cos": router.min_cos, "positives": len(pos),
              "negatives": len(neg), "open_positives": choice[2] if len(pos) else None,
              "open_negatives": choice[3] if len(pos) else None, "max_false_open": max_false_open}
    router.calibration = report
    log.info("gate calibrated: %s", report)
    return report


# ---- the training job's routing: the tree, every document's path, the router --------------------------------


def route_documents(cfg, docs: list[dict], out: Path, d, probes: list | None = None):
    """The tree and every document's path, built once by rank 0 and cached in the job directory.

    With ``cfg.routing == "docs"`` the documents that share a name are grouped into one leaf and the
    nearest-document router (memory_store.router) is built over them and its gate calibrated on the
    corpus's ``valid`` probes (see training/routing.py); it is exported with the bank."""
    from memory_store import Tree
    from training.distributed import barrier

    tree_file, paths_file, emb_file = out / "tree.safetensors", out / "doc_paths.npy", out / "doc_emb.npy"
    if d.main and not paths_file.exists():
        if emb_file.exists() and len(np.load(emb_file)) == len(docs):
            emb = np.load(emb_file)
        else:
            t0 = time.perf_counter()
            emb = embed(doc_route_texts(docs), get_embedder(cfg.embedder))
            np.save(emb_file, emb)
            log.info("embedded %d documents in %.1fs", len(docs), time.perf_counter() - t0)
        if cfg.tree:
            tree = Tree.load(cfg.tree)
        elif tree_file.exists():
            tree = Tree.load(tree_file)
        else:
            tree = build_corpus_tree(emb, cfg.branching, seed=cfg.seed)
        if tree.branching != list(cfg.branching):
            raise ValueError(f"tree branching {tree.branching} != --branching {cfg.branching}")
        tree.save(tree_file)
        if cfg.routing == "docs":
            groups = group_documents([doc["text"] for doc in docs])
            paths = group_paths(tree, emb, groups)
            log.info("%d documents in %d groups (largest %d)", len(docs), int(groups.max()) + 1,
                     int(np.bincount(groups).max()))
            build_router(cfg, docs, paths, out / "router", probes or [])
        else:
            paths = tree.route(emb)
        np.save(paths_file, paths)
    barrier(d)
    return Tree.load(tree_file), np.load(paths_file)


def make_router(docs: Sequence[dict], paths: np.ndarray, embedder, probes: Sequence,
                max_false_open: float = 0.02):
    """The nearest-document router of these documents (route_text, when given, is indexed with the text),
    its gate calibrated on data: the corpus's ``valid`` probes (trained facts in wordings kept apart from the
    test probes) should pass, its ``valid_heldout`` probes and the general-prompt validation set should not."""
    from memory_store.router import DocRouter

    texts = [doc["route_text"] + " " + doc["text"] if doc.get("route_text") else doc["text"] for doc in docs]
    router = DocRouter.build(texts, paths, lambda xs: embed(xs, embedder), doc_ids=[doc["id"] for doc in docs])
    positives = [p.prompt for p in probes if p.split == "valid"]
    source = "valid probes"
    if not positives:  # a user's corpus: nothing but documents
        positives, source = document_openings(docs), "document openings"
    negatives = [p.prompt for p in probes if p.split == "valid_heldout"] + general_validation_prompts()
    calibrate_gate(router, embedder, positives, negatives, max_false_open=max_false_open)
    router.calibration["positives_source"] = source
    return router


def document_openings(docs: Sequence[dict]) -> list[str]:
    """Stand-in positives for the gate when a corpus has no ``valid`` probes: each document's first
    sentence cut before its last word, as a prompt about the document's subject would read. They are
    easier than questions in other words, so the gate calibrated on them errs on the closed side: it still
    lets through at most ``max_false_open`` of the negatives (without any positives, the gate kept its
    default and let 9% of the general validation prompts through on the facts corpus)."""
    out = []
    for d in docs:
        first = re.split(r"(?<=[.!?])\s+", d["text"].strip())[0]
        cut = first.rstrip(".!? ").rsplit(" ", 1)[0]
        if len(cut.split()) >= 2:
            out.append(cut)
    return out


def build_router(cfg, docs: list[dict], paths: np.ndarray, out: Path, probes: list) -> None:
    """`make_router` for a training job, saved into the job directory (exported with the bank)."""
    t0 = time.perf_counter()
    router = make_router(docs, paths, get_embedder(cfg.embedder), probes, cfg.gate_max_false_open)
    out.mkdir(parents=True, exist_ok=True)
    router.save(out)
    log.info("router over %d documents (%d views) in %.1fs", router.n_docs, len(router.view_emb),
             time.perf_counter() - t0)


def general_validation_prompts() -> list[str]:
    """The repository's general prompts kept for validation (never the evaluation half)."""
    from training.corpus_docs import load_general_prompts

    return [r["text"] for r in load_general_prompts("valid")]
