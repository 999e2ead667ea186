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
from collections.abc import Sequence

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
    """Routing agreement for the two choices of what to embed for a document: its ``route_text`` (the
    choice made here) and its whole ``text`` (the obvious alternative). Prompts are embedded as they are."""
    embedder = get_embedder(embedder_name)
    out = {}
    for name, texts in (("route_text", doc_route_texts(docs)), ("text", [d["text"] for d in docs])):
        emb = embed(texts, embedder)
        tree = build_corpus_tree(emb, branching, seed=seed)
        out[name] = routing_agreement(tree, docs, probes, tree.route(emb), embedder)
    return out
