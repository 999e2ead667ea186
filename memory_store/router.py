"""Routing through the nearest trained documents, with a confidence gate.

The tree's greedy descent (`Tree.route`) sends a prompt to the leaf whose centroid it is nearest. Questions
as users write them look to a sentence embedder more like each other than like the documents that hold
their facts, so descent often lands in a leaf that never saw the fact, and every prompt -- also one the bank
knows nothing about -- gets some leaf's blocks. The router fixes both:

* **Retrieve, then take the document's path.** The bank keeps an index of its trained documents: one
  embedding per *view* (the whole document and each of its sentences) and the path every document was
  trained into. A prompt's candidates are the documents of its nearest views (cosine) plus the documents
  that share its rare words (a small inverted index: names and codes that an embedder blurs); the best
  candidate by ``cosine + lexical_weight * shared rarity`` gives the path.
* **Gate.** Memory is used only when the best candidate shares a rare word with the prompt (inverse
  document frequency at least ``min_idf``) and is close enough (``cosine >= min_cos``), or when it shares
  a name-rare word (``idf >= name_idf``, a word few documents hold: the subject's name or code) at a lower
  cosine (``name_cos``): a long message about a trained subject ("I am flying to X next week, ...") is
  far from every document as a whole but names the subject. Otherwise the request runs on the anchor
  alone: a prompt about something the bank does not hold is left as the anchor would answer it. The
  thresholds are chosen on data when the bank is built (training/routing.py, docs/training.md) and stored
  with the index; an index without the name tier (``name_idf`` absent) never opens by it.

Files in the bank directory (optional: a bank without them routes by descent, ungated):
``router.safetensors`` (view embeddings, view -> document, document paths, words per document as CSR) and
``router.json`` (format, vocabulary with document frequencies, thresholds, sha256 of the tensors file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from memory_store.errors import BankError

TENSORS_FILE = "router.safetensors"
META_FILE = "router.json"
FORMAT = "hiermem-router-1"

STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does for from had has have he her his how i if in into "
    "is it its me my no not of on or our she so than that the their them then there these they this to too us "
    "was we were what when where which who whom why will with would you your about also".split())

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> list[str]:
    """Lower-cased words of `text` that can carry meaning (no stop words, no single letters)."""
    return [w for w in _WORD.findall(text.lower()) if (len(w) > 1 or w.isdigit()) and w not in STOPWORDS]


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split after . ! or ?), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def views(text: str) -> list[str]:
    """What a document is indexed by: the whole text, then each sentence (when there are several)."""
    parts = sentences(text)
    return [text] + (parts if len(parts) > 1 else [])


@dataclass(frozen=True)
class Route:
    """Where one prompt goes. `path` is None when the gate is closed (no document matches well enough)."""

    path: tuple[int, ...] | None
    doc: int  # index of the best candidate document (-1: none)
    cos: float  # cosine of the prompt to that document's nearest view
    idf: float  # largest inverse document frequency among the words prompt and document share
    score: float
    name_idf: float = 0.0  # the same among the shared words that hold a letter (names and codes, not numbers)

    @property
    def gated(self) -> bool:
        return self.path is None


class DocRouter:
    """Nearest-document routing with a gate (see the module docstring)."""

    def __init__(self, view_emb: np.ndarray, view_doc: np.ndarray, doc_paths: np.ndarray,
                 doc_word_ptr: np.ndarray, doc_word_ids: np.ndarray, vocab: Sequence[str],
                 df: np.ndarray | Sequence[int], *, min_idf: float, min_cos: float, lexical_weight: float = 0.5,
                 top_views: int = 32, max_docs_per_word: int = 64, calibration: dict | None = None,
                 doc_ids: Sequence[str] | None = None, name_idf: float = math.inf,
                 name_cos: float = 1.0) -> None:
        self.view_emb = np.ascontiguousarray(view_emb, dtype=np.float32)
        self.view_doc = np.asarray(view_doc, dtype=np.int64)
        self.doc_paths = np.asarray(doc_paths, dtype=np.int64)
        self.doc_word_ptr = np.asarray(doc_word_ptr, dtype=np.int64)
        self.doc_word_ids = np.asarray(doc_word_ids, dtype=np.int64)
        self.vocab = list(vocab)
        self.df = np.asarray(df, dtype=np.int64)
        self.n_docs = len(self.doc_paths)
        if len(self.view_emb) != len(self.view_doc) or len(self.doc_word_ptr) != self.n_docs + 1:
            raise BankError("router index is inconsistent (views, documents and words disagree)")
        self.min_idf, self.min_cos = float(min_idf), float(min_cos)
        self.name_idf, self.name_cos = float(name_idf), float(name_cos)
        self.lexical_weight, self.top_views = float(lexical_weight), int(top_views)
        self.max_docs_per_word = int(max_docs_per_word)
        self.calibration = dict(calibration or {})
        self.doc_ids = list(doc_ids) if doc_ids is not None else [str(i) for i in range(self.n_docs)]
        self._word_id = {w: i for i, w in enumerate(self.vocab)}
        self._lettered = [any(ch.isalpha() for ch in w) for w in self.vocab]
        self._idf = np.log((self.n_docs + 1) / (self.df + 1)).astype(np.float32)
        self.max_idf = float(math.log(self.n_docs + 1))  # a word no document has
        self._doc_views = _group(self.view_doc, np.arange(len(self.view_doc)), self.n_docs)  # views of a doc
        self._word_docs = _group(self.doc_word_ids, np.repeat(np.arange(self.n_docs), np.diff(self.doc_word_ptr)),
                                 len(self.vocab))  # documents holding a word
        self._index: Any = None  # faiss.IndexFlatIP over the views, made on first use

    # ---- building ---------------------------------------------------------------------------------------

    @classmethod
    def build(cls, doc_texts: Sequence[str], doc_paths: np.ndarray, embed, *, min_idf: float | None = None,
              min_cos: float = 0.0, doc_ids: Sequence[str] | None = None, **options) -> DocRouter:
        """Index documents (`embed(list[str]) -> float32[N, dim]`, L2-normalised) with their paths."""
        view_texts, view_doc = [], []
        for d, text in enumerate(doc_texts):
            for v in views(text):
                view_texts.append(v)
                view_doc.append(d)
        view_emb = np.asarray(embed(view_texts), dtype=np.float32)
        vocab: dict[str, int] = {}
        per_doc = [sorted({vocab.setdefault(w, len(vocab)) for w in words(t)}) for t in doc_texts]
        df = np.zeros(len(vocab), dtype=np.int64)
        for ids in per_doc:
            df[ids] += 1
        ptr = np.zeros(len(doc_texts) + 1, dtype=np.int64)
        ptr[1:] = np.cumsum([len(ids) for ids in per_doc])
        flat = np.fromiter((i for ids in per_doc for i in ids), dtype=np.int64, count=int(ptr[-1]))
        if min_idf is None:
            min_idf = default_min_idf(len(doc_texts))
        return cls(view_emb, np.asarray(view_doc), doc_paths, ptr, flat, sorted(vocab, key=vocab.__getitem__),
                   df, min_idf=min_idf, min_cos=min_cos, doc_ids=doc_ids, **options)

    # ---- routing ----------------------------------------------------------------------------------------

    def candidates(self, emb: np.ndarray, text: str, allowed_level1: Iterable[int] | None = None) -> list[Route]:
        """Every candidate document of one prompt, best first (gate not applied: `path` always set).

        `emb`: the prompt's embedding, or one row per `query_texts(text)` (the whole prompt, then each of its
        sentences): a document's cosine is then its best over the rows, so a long message is as close to a
        document as its sentence about the document's subject."""
        emb = np.atleast_2d(np.asarray(emb, dtype=np.float32))
        q_words = {w for w in words(text)}
        q_ids = {self._word_id[w] for w in q_words if w in self._word_id}
        cand: set[int] = {int(self.view_doc[v]) for v in self._search(emb)}
        for wid in q_ids:
            docs = self._word_docs[wid]
            if len(docs) <= self.max_docs_per_word:
                cand.update(int(d) for d in docs)
        allowed = None if allowed_level1 is None else frozenset(int(i) for i in allowed_level1)
        out = []
        for d in cand:
            if allowed is not None and int(self.doc_paths[d, 0]) not in allowed:
                continue
            shared = [int(w) for w in self.doc_word_ids[self.doc_word_ptr[d]:self.doc_word_ptr[d + 1]]
                      if int(w) in q_ids]
            idfs = self._idf[shared] if shared else np.zeros(0, dtype=np.float32)
            cos = float(np.max(self.view_emb[self._doc_views[d]] @ emb.T))
            score = cos + self.lexical_weight * float(idfs.sum()) / self.max_idf
            lettered = [i for w, i in zip(shared, idfs.tolist(), strict=True) if self._lettered[w]]
            out.append(Route(tuple(int(x) for x in self.doc_paths[d]), d, cos,
                             float(idfs.max()) if len(idfs) else 0.0, score, max(lettered, default=0.0)))
        out.sort(key=lambda r: (-r.score, r.doc))
        return out

    def route_one(self, emb: np.ndarray, text: str, allowed_level1: Iterable[int] | None = None) -> Route:
        cands = self.candidates(emb, text, allowed_level1)
        return self.gate(cands[0] if cands else None)

    def gate(self, best: Route | None) -> Route:
        """`best` (a prompt's best candidate, None when it has none) with its path, or without one (gated)
        when the gate stays closed."""
        if best is None:
            return Route(None, -1, 0.0, 0.0, 0.0)
        return best if self.open(best.cos, best.idf, best.name_idf) else replace(best, path=None)

    @staticmethod
    def query_texts(text: str) -> list[str]:
        """What to embed for a prompt: the whole prompt, then each of its sentences when it has several (at
        most 8: the first 7 and the last, where a question usually stands)."""
        parts = sentences(text)
        if len(parts) <= 1:
            return [text]
        return [text] + (parts if len(parts) <= 8 else parts[:7] + parts[-1:])

    def embed_queries(self, texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]) -> list[np.ndarray]:
        """Per text, the embeddings of its `query_texts` (one `embed` call for all of them)."""
        parts = [self.query_texts(t) for t in texts]
        flat = [q for qs in parts for q in qs]
        emb = np.asarray(embed(flat), dtype=np.float32) if flat else np.zeros((0, self.view_emb.shape[1]), np.float32)
        bounds = np.cumsum([0] + [len(qs) for qs in parts])
        return [emb[bounds[i]:bounds[i + 1]] for i in range(len(texts))]

    def nearest(self, texts: Sequence[str], embed: Callable[[list[str]], np.ndarray],
                allowed_level1: Iterable[int] | None = None) -> list[Route | None]:
        """Each text's best candidate, gate not applied (None: it has none), embedded by `embed_queries`:
        where a prompt would go if the gate let it through."""
        out: list[Route | None] = []
        for e, t in zip(self.embed_queries(texts, embed), texts, strict=True):
            cands = self.candidates(e, t, allowed_level1)
            out.append(cands[0] if cands else None)
        return out

    def route_texts(self, texts: Sequence[str], embed: Callable[[list[str]], np.ndarray],
                    allowed_level1: Iterable[int] | None = None) -> list[Route]:
        """`route_one` for each text, embedded by `embed_queries`: the model server's routing."""
        return [self.gate(best) for best in self.nearest(texts, embed, allowed_level1)]

    def route(self, emb: np.ndarray, texts: Sequence[str], allowed_level1: Iterable[int] | None = None
              ) -> list[Route]:
        emb = np.atleast_2d(np.asarray(emb, dtype=np.float32))
        if len(emb) != len(texts):
            raise BankError(f"{len(emb)} embeddings for {len(texts)} texts")
        return [self.route_one(e, t, allowed_level1) for e, t in zip(emb, texts, strict=True)]

    def open(self, cos: float, idf: float, name_idf: float = 0.0) -> bool:
        """The gate: a shared word that some documents lack (idf > 0), rare enough and close enough; or a
        shared name-rare word with a letter (`Route.name_idf`: a name or code, not a number such as a
        population that a sum shares by chance) at the name tier's lower cosine."""
        return idf > 0 and ((idf >= self.min_idf and cos >= self.min_cos)
                            or (name_idf > 0 and name_idf >= self.name_idf and cos >= self.name_cos))

    def _search(self, emb: np.ndarray) -> np.ndarray:
        """The nearest views of every row of `emb` (N, dim), in one search, each view once."""
        k = min(self.top_views, len(self.view_emb))
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        if self._index is None:
            import faiss

            index = faiss.IndexFlatIP(self.view_emb.shape[1])
            index.add(self.view_emb)
            self._index = index
        _, ids = self._index.search(np.ascontiguousarray(emb), k)
        return np.unique(ids[ids >= 0])

    # ---- files ------------------------------------------------------------------------------------------

    def save(self, dir: str | Path) -> None:
        from safetensors.numpy import save_file

        dir = Path(dir)
        tensors: dict[str, np.ndarray] = {"view_emb": self.view_emb, "view_doc": self.view_doc, "doc_paths": self.doc_paths,
                   "doc_word_ptr": self.doc_word_ptr, "doc_word_ids": self.doc_word_ids, "df": self.df}
        tmp = dir / (TENSORS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, dir / TENSORS_FILE)
        meta = {"format": FORMAT, "sha256": _sha256(dir / TENSORS_FILE), "vocab": self.vocab,
                "min_idf": self.min_idf, "min_cos": self.min_cos, "lexical_weight": self.lexical_weight,
                **({"name_idf": self.name_idf, "name_cos": self.name_cos} if math.isfinite(self.name_idf) else {}),
                "top_views": self.top_views, "max_docs_per_word": self.max_docs_per_word,
                "calibration": self.calibration, "doc_ids": self.doc_ids}
        tmp = dir / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, ensure_ascii=False))
        os.replace(tmp, dir / META_FILE)

    @classmethod
    def load(cls, dir: str | Path) -> DocRouter | None:
        """The router stored in a bank directory, or None when the bank has none."""
        from safetensors.numpy import load_file

        dir = Path(dir)
        if not (dir / META_FILE).exists():
            return None
        try:
            meta = json.loads((dir / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise BankError(f"{dir / META_FILE}: unreadable ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise BankError(f"{dir / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if _sha256(dir / TENSORS_FILE) != meta.get("sha256"):
            raise BankError(f"{dir / TENSORS_FILE} does not match the sha256 in {META_FILE}")
        t = load_file(str(dir / TENSORS_FILE))
        return cls(t["view_emb"], t["view_doc"], t["doc_paths"], t["doc_word_ptr"], t["doc_word_ids"],
                   meta["vocab"], t["df"], min_idf=meta["min_idf"], min_cos=meta["min_cos"],
                   lexical_weight=meta.get("lexical_weight", 0.5), top_views=meta.get("top_views", 32),
                   max_docs_per_word=meta.get("max_docs_per_word", 64), calibration=meta.get("calibration"),
                   doc_ids=meta.get("doc_ids"), name_idf=meta.get("name_idf", math.inf),
                   name_cos=meta.get("name_cos", 1.0))

    @staticmethod
    def copy_files(src: str | Path, dst: str | Path) -> bool:
        """Copy a bank's router files to another bank directory (bank operations keep the router)."""
        import shutil

        src, dst = Path(src), Path(dst)
        if not (src / META_FILE).exists():
            return False
        for name in (TENSORS_FILE, META_FILE):
            shutil.copy2(src / name, dst / name)
        return True


def default_min_idf(n_docs: int) -> float:
    """Without calibration data: a shared word must be in at most ~1% of documents (at least 3)."""
    df = max(3.0, 0.01 * n_docs)
    return float(math.log((n_docs + 1) / (df + 1)))


def _group(keys: np.ndarray, values: np.ndarray, n: int) -> list[np.ndarray]:
    """For each key 0..n-1, the `values[i]` whose `keys[i]` is that key (in order of i)."""
    sort = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[sort], np.arange(n + 1))
    return [values[sort[bounds[k]:bounds[k + 1]]] for k in range(n)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
