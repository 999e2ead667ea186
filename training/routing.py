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
import math
import re
import time
from collections.abc import Mapping, Sequence
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
        bests = router.nearest(texts, lambda xs: embed(xs, embedder))
        return [(b.path if b else None, not router.gate(b).gated) for b in bests]

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


def calibrate_gate(router, embedder, positives: Sequence[str], negatives: Sequence[str] | Mapping[str, Sequence[str]],
                   max_false_open: float = 0.02, name_tier: bool = True) -> dict:
    """Choose the router's gate thresholds on data: the most permissive (min_idf, min_cos) -- and, with
    `name_tier`, (name_idf, name_cos): a name-rare shared word at a lower cosine -- whose share of
    `negatives` (prompts the bank should leave alone; with families, in every family) let through is at most
    `max_false_open`, maximising
    the share of `positives` (prompts about trained subjects, in wordings not used for testing) let through.
    Sets them on `router` and returns the figures (stored in the router's `calibration`)."""
    def best(texts: Sequence[str]) -> np.ndarray:
        """(idf, cos, name_idf) of each text's best candidate, as the model server would see it."""
        rows = [(b.idf, b.cos, b.name_idf) if b else (0.0, -1.0, 0.0)
                for b in router.nearest(list(texts), lambda xs: embed(xs, embedder))]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 3)

    families = dict(negatives) if isinstance(negatives, Mapping) else {"negatives": negatives}
    pos = best(positives)
    negs = [best(list(v)) for v in families.values() if len(v)]
    neg = np.concatenate(negs) if negs else np.zeros((0, 3))
    if not len(pos):
        report = {"min_idf": router.min_idf, "min_cos": router.min_cos, "positives": 0, "negatives": len(neg),
                  "open_positives": None, "open_negatives": None, "max_false_open": max_false_open}
        router.calibration = report
        return report

    def grid(values) -> np.ndarray:
        """Thresholds rounded *down* to 6 decimals (kept readable in router.json): a threshold at a positive's
        own value must still let it through (the float32 score is compared with the stored float)."""
        return np.unique(np.floor(np.asarray(values, dtype=np.float64) * 1e6) / 1e6)

    idf_grid = grid([0.0, *np.quantile(pos[:, 0], np.linspace(0, 0.5, 26)), math.inf])  # inf: cosine tier off
    cos_grid = grid([-1.0, *np.quantile(pos[:, 1], np.linspace(0, 0.3, 13))])
    # the name tier: idf over most of the positives' range, cosine over its low half
    name_idf_grid: np.ndarray | list[float] = grid(np.quantile(pos[:, 2], np.linspace(0, 0.9, 19))) if name_tier else []
    name_cos_grid = grid([-1.0, *np.quantile(pos[:, 1], np.linspace(0, 0.5, 11))])

    def opened(x: np.ndarray, ti: np.ndarray, tc: np.ndarray, column: int = 0) -> np.ndarray:
        """(len(ti), len(x)) bool: which rows of x pass (idf >= ti, cos >= tc), idf > 0 always required;
        `column` 2 reads the name tier's idf (DocRouter.open)."""
        idf = x[None, :, column]
        return (x[None, :, 0] > 0) & (idf > 0) & (idf >= ti[:, None]) & (x[None, :, 1] >= tc[:, None])

    ti, tc = (g.ravel() for g in np.meshgrid(idf_grid, cos_grid, indexing="ij"))
    base_pos, base_neg = opened(pos, ti, tc), [opened(n, ti, tc) for n in negs]  # (G, n)
    tiers = [(math.inf, 1.0)] + [(float(a), float(b)) for a in name_idf_grid for b in name_cos_grid]
    choice = (router.min_idf, router.min_cos, math.inf, 1.0, -1.0, 1.0)
    for ni, nc in tiers:
        extra_pos = opened(pos, np.array([ni]), np.array([nc]), 2)[0]
        tpr = np.mean(base_pos | extra_pos[None, :], axis=1)
        fpr = np.zeros(len(ti))  # the worst family's share let through
        for n, b in zip(negs, base_neg, strict=True):
            fpr = np.maximum(fpr, np.mean(b | opened(n, np.array([ni]), np.array([nc]), 2)[0][None, :], axis=1))
        ok = fpr <= max_false_open
        if not ok.any():
            continue
        # most positives let through, then fewest negatives (np.lexsort: last key first)
        cand = np.flatnonzero(ok)
        k = cand[np.lexsort((fpr[cand], -tpr[cand]))[0]]
        if (tpr[k], -fpr[k]) > (choice[4], -choice[5]):
            choice = (float(ti[k]), float(tc[k]), ni, nc, float(tpr[k]), float(fpr[k]))
    router.min_idf, router.min_cos, router.name_idf, router.name_cos = choice[:4]
    report = {"min_idf": router.min_idf, "min_cos": router.min_cos,
              "name_idf": router.name_idf if math.isfinite(router.name_idf) else None,
              "name_cos": router.name_cos if math.isfinite(router.name_idf) else None,
              "positives": len(pos), "negatives": {k: len(v) for k, v in families.items()},
              "open_positives": choice[4],
              "open_negatives": choice[5], "max_false_open": max_false_open}
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
    its gate calibrated on data (`gate_prompts`)."""
    from memory_store.router import DocRouter

    texts = [doc["route_text"] + " " + doc["text"] if doc.get("route_text") else doc["text"] for doc in docs]
    router = DocRouter.build(texts, paths, lambda xs: embed(xs, embedder), doc_ids=[doc["id"] for doc in docs])
    positives, negatives, source = gate_prompts(docs, probes, dict(zip(router.vocab, router.df.tolist(), strict=True)))
    calibrate_gate(router, embedder, positives, negatives, max_false_open=max_false_open)
    router.calibration["positives_source"] = source
    return router


def gate_prompts(docs: Sequence[dict], probes: Sequence, df: dict[str, int]
                 ) -> tuple[list[str], dict[str, list[str]], str]:
    """(positives, negatives by family, what the positives are) for the gate's calibration.

    Positives: the corpus's ``valid`` probes (trained facts in wordings kept apart from the test probes) or,
    for a user's corpus without them, each document's opening; and in both cases questions and requests
    about each document's subject in the generic `chat_forms.CALIBRATION_FORMS` (two per subject), so that
    the gate opens for the way people ask, not only for the documents' own phrasing. Negatives: the
    corpus's ``valid_heldout`` probes, the general-prompt validation set, and the openings and forms with
    the subject's name swapped for an invented one and every other rare word (document frequency `df` at
    most 1% of the documents, at least 3: names, codes, numbers) left out, so that they share the
    documents' domain words ("city", "state") but no name: a question about a subject the bank does not
    hold must stay closed."""
    from training.chat_forms import CALIBRATION_FORMS, swapped_subjects
    from training.views import subject_names

    names = subject_names(docs)
    valid = [p.prompt for p in probes if p.split == "valid"]
    openings = document_openings(docs, names)
    base, source = (valid, "valid probes") if valid else ([o for o, _ in openings], "document openings")
    subjects = list(dict.fromkeys(n for n in names if n))
    k = len(CALIBRATION_FORMS)
    forms = [(CALIBRATION_FORMS[(i + j) % k].format(name=n), n) for i, n in enumerate(subjects) for j in (0, k // 2)]
    positives = base + [f for f, _ in forms]
    source += f" + {len(subjects)} subjects in the calibration forms"
    rare = max(3.0, 0.01 * len(docs))
    swapped = swapped_subjects([t for t, _ in openings + forms], [n for _, n in openings + forms])
    negatives = {"valid_heldout": [p.prompt for p in probes if p.split == "valid_heldout"],
                 "general": general_validation_prompts(),
                 "invented subjects": [_without_rare_words(t, df, rare) for t in swapped]}
    return positives, negatives, source


def _without_rare_words(text: str, df: dict[str, int], rare: float) -> str:
    """`text` without the words that at most `rare` documents hold (words no document holds stay)."""
    from memory_store.router import words

    drop = {w for w in words(text) if 0 < df.get(w, 0) <= rare}
    return " ".join(t for t in text.split() if not (set(words(t)) & drop))


def document_openings(docs: Sequence[dict], names: Sequence[str | None] | None = None
                      ) -> list[tuple[str, str | None]]:
    """Stand-in positives for the gate when a corpus has no ``valid`` probes: each document's first
    sentence cut before its last word, as a prompt about the document's subject would read, with the
    document's subject name (`names[i]`, None when not given). They are easier than questions in other
    words, which is why the gate also calibrates on questions about each subject (`gate_prompts`)."""
    out = []
    for i, d in enumerate(docs):
        first = re.split(r"(?<=[.!?])\s+", d["text"].strip())[0]
        cut = first.rstrip(".!? ").rsplit(" ", 1)[0]
        if len(cut.split()) >= 2:
            out.append((cut, names[i] if names is not None else None))
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
