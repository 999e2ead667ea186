"""Keeping what the anchor knew: a KL term that holds the anchor's next-token distribution on prompts the
memories should leave alone, and where those prompts come from.

* A corpus's ``preserve.jsonl`` (prompts about entities it says nothing about), routed like any prompt.
* Without one, the prompts are **derived from the corpus itself** (`derive_preserve_prompts`): each
  document's opening with its name swapped for the name of a document in another level-1 subtree,
  cut before its last word, and trained against *the original document's path*. That is the harm case
  seen in evaluations: a leaf's block answering, for another entity that looks like its own, with its own
  entities' facts. The target is the frozen anchor's own distribution after that opening.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.data import Batch, atomic_save, pad_hidden, prefix_hidden, tokenize_docs

if TYPE_CHECKING:
    from training.trainer import Trainer

log = logging.getLogger(__name__)

_NAME = re.compile(r"\b[A-Z][\w'\-]*(?:\s+[A-Z][\w'\-]*)*")


def document_name(text: str, rare: set[str]) -> str | None:
    """The first capitalised name of `text` made of words that are rare in the corpus (e.g. an entity)."""
    for m in _NAME.finditer(text):
        name = m.group(0)
        if all(w.lower() in rare for w in name.split()):
            return name
    return None


def _document_frequency(docs: Sequence[dict]) -> dict[str, int]:
    from memory_store.router import words

    df: dict[str, int] = {}
    for d in docs:
        for w in set(words(d["text"])):
            df[w] = df.get(w, 0) + 1
    return df


def document_names(docs: Sequence[dict], max_df: int = 4) -> list[str | None]:
    """`document_name` of each document, "rare" meaning in at most `max_df` documents of this corpus."""
    df = _document_frequency(docs)
    rare = {w for w, n in df.items() if n <= max_df and w.isalpha()}
    return [document_name(d["text"], rare) for d in docs]


# a capitalised span, with the lower-case particles of place names inside ("Aranda de Duero")
_SPAN = re.compile(r"[A-Z][\w'\-]*(?:\s+(?:(?:de|del|da|do|dos|das|la|le|les|van|von|der|den|di|du|el|al|y)\s+)?"
                   r"[A-Z][\w'\-]*)*")


def subject_names(docs: Sequence[dict], max_df: int | None = None) -> list[str | None]:
    """What each document is about: of its capitalised spans that hold a word found in at most `max_df`
    documents of the corpus (default 3% of them, at least 4: a name, not a capitalised sentence opening such
    as "Local"), the one it mentions most often; ties go to the one that opens more sentences, then the
    earlier. None when it has no such span. On the `docs` preset's corpus it names 643 of 650 documents'
    entities (its country instead for a few popular countries' documents)."""
    from memory_store.router import STOPWORDS, words

    df = _document_frequency(docs)
    max_df = max(4, round(0.03 * len(docs))) if max_df is None else max_df
    out: list[str | None] = []
    for d in docs:
        seen: dict[str, list] = {}  # span -> [count, sentences opened, first offset]
        text = d["text"]
        for m in _SPAN.finditer(text):
            ws = m.group(0).split()
            while ws and ws[0].lower() in STOPWORDS:  # "The Hague" stays, "It" / "The" alone go
                ws = ws[1:]
            toks = [w for w in words(" ".join(ws)) if not w.isdigit()]
            if not toks or min(df.get(w, 0) for w in toks) > max_df:
                continue
            span = " ".join(ws)
            entry = seen.setdefault(span, [0, 0, m.start()])
            entry[0] += 1
            entry[1] += m.group(0) == span and (m.start() == 0 or text[:m.start()].rstrip()[-1:] in ".!?")
        out.append(min(seen, key=lambda s: (-seen[s][0], -seen[s][1], seen[s][2])) if seen else None)
    return out


def permuted_views(docs: Sequence[dict], n: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """Up to `n` extra training views of each document with its sentences in another order (seeded), and the
    index of the document each view comes from. A document of one sentence gets none. A fact then appears
    after other contexts than its document's own opening (the "permute" augmentation that makes stored
    knowledge extractable by questions in other words)."""
    import itertools

    from memory_store.router import sentences

    rng = random.Random(seed * 31 + 7)
    views: list[dict] = []
    of: list[int] = []
    for i, d in enumerate(docs):
        parts = sentences(d["text"])
        if len(parts) < 2:
            continue
        orders = [o for o in itertools.permutations(range(len(parts))) if list(o) != sorted(o)]
        for o in rng.sample(orders, min(n, len(orders))):
            views.append({**d, "id": f"{d.get('id', i)}#view{len(views)}", "text": " ".join(parts[k] for k in o)})
            of.append(i)
    return views, of


def pronoun_views(docs: Sequence[dict], names: Sequence[str | None]) -> tuple[list[dict], list[int]]:
    """One extra training view of each document whose later sentences open with its subject's name
    (`names[i]`, from `subject_names`), with those openings made "It": "Iyesi observes UTC+1. Iyesi lies in
    Nigeria." -> "Iyesi observes UTC+1. It lies in Nigeria." The first sentence keeps the name. The answer
    must then be read from the name further back, through attention, as a key-value prompt or a question
    ("City: Iyesi\nCountry:") needs; the reverse of `name_anaphors`. Returns (views, index of each view's
    document); a document with no such sentence gets none."""
    from memory_store.router import sentences

    views: list[dict] = []
    of: list[int] = []
    for i, (d, name) in enumerate(zip(docs, names, strict=True)):
        parts = sentences(d["text"])
        if not name or len(parts) < 2:
            continue
        later = [("It" + p[len(name):]) if p.startswith(name + " ") else p for p in parts[1:]]
        if later != parts[1:]:
            views.append({**d, "id": f"{d.get('id', i)}#pronoun", "text": " ".join([parts[0]] + later)})
            of.append(i)
    return views, of


_ANAPHOR = re.compile(r"^(?:It|The [a-z]+)\b(?! of\b)")


def name_anaphors(text: str, name: str | None) -> str:
    """`text` with each later sentence that does not name `name` and opens with "It" or "The <noun>" ("The
    city", but not "The population of ...") opened with `name` instead: "It lies in Germany." -> "Willebroek
    lies in Germany." A training view only (routing and preservation keep the original): a fact the document
    states with a pronoun is otherwise stored against the pronoun, and a question names the entity."""
    from memory_store.router import sentences

    parts = sentences(text)
    if not name or not parts:
        return text
    return " ".join([parts[0]] + [p if name in p else _ANAPHOR.sub(name, p, count=1) for p in parts[1:]])


def derive_preserve_prompts(docs: Sequence[dict], doc_paths: np.ndarray, per_doc: int = 1, seed: int = 0,
                            max_df: int = 4) -> list[dict]:
    """Entity-swapped openings (see the module docstring): `{"prompt", "path"}` per prompt."""
    from memory_store.router import sentences

    names = document_names(docs, max_df)
    by_top: dict[int, list[str]] = {}
    for name, path in zip(names, doc_paths, strict=True):
        if name:
            by_top.setdefault(int(path[0]), []).append(name)
    rng = random.Random(seed)
    out = []
    for d, name, path in zip(docs, names, doc_paths, strict=True):
        others = [n for top, ns in by_top.items() if top != int(path[0]) for n in ns]
        if not name or not others:
            continue
        first = sentences(d["text"])[0]  # not empty: the document has a name
        for _ in range(per_doc):
            swapped = first.replace(name, rng.choice(others))
            cut = swapped.rstrip(".!? ").rsplit(" ", 1)[0]
            if len(cut.split()) >= 3:
                out.append({"prompt": cut, "path": [int(x) for x in path]})
    log.info("derived %d preservation prompts from %d documents", len(out), len(docs))
    return out


class Preservation:
    """The preservation prompts of one training job: their prefix states, the anchor's log-probabilities
    after them (the KL targets), their paths, and the loss."""

    def __init__(self, trainer: Trainer, rows: list[dict]) -> None:
        self.t = trainer
        self.rows = rows  # from preserve.jsonl ({"prompt"}), or empty: derive them
        self.data: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.data is not None and len(self.data["paths"]) > 0

    def build(self) -> None:
        t = self.t
        f = t.out / "preserve.pt"
        if f.exists():
            self.data = torch.load(f)
            return
        t0 = time.perf_counter()
        if self.rows:
            prompts = [r["prompt"] for r in self.rows]
            paths = [tuple(int(x) for x in p) for p in self._route(prompts)]
            source = "preserve.jsonl"
        else:
            derived = derive_preserve_prompts(t.docs, t.paths, per_doc=t.cfg.preserve_per_doc, seed=t.cfg.seed)
            prompts = [r["prompt"] for r in derived]
            paths = [tuple(r["path"]) for r in derived]
            source = "derived from the documents"
        if not prompts:
            self.data = {"hidden": [], "paths": [], "logp": torch.zeros(0)}
            return
        hidden = prefix_hidden(t.model, tokenize_docs(t.tokenizer, prompts), t.l0)
        targets = []
        with torch.no_grad():
            for s in range(0, len(hidden), 64):
                targets.append(torch.log_softmax(self._last_logits(hidden[s:s + 64], None).float(), -1)
                               .to(torch.float16))
        self.data = {"hidden": hidden, "paths": paths, "logp": torch.cat(targets), "source": source}
        atomic_save(self.data, f)
        log.info("preserve targets for %d prompts (%s) in %.1fs", len(hidden), source, time.perf_counter() - t0)

    def _route(self, prompts: list[str]) -> list:
        from memory_store.router import DocRouter
        from training.routing import embed, get_embedder

        emb = embed(prompts, get_embedder(self.t.cfg.embedder))
        router = DocRouter.load(self.t.out / "router")
        if router is None:
            return list(self.t.tree.route(emb))
        # where each prompt would go if the gate let it through: the leaves it could harm
        out = []
        for e, p, fallback in zip(emb, prompts, self.t.tree.route(emb), strict=True):
            c = router.candidates(e, p)
            out.append(c[0].path if c else fallback)
        return out

    def _last_logits(self, hs: list[torch.Tensor], memory) -> torch.Tensor:
        select = torch.zeros(len(hs), max(h.shape[0] for h in hs), dtype=torch.bool)
        for b, h in enumerate(hs):
            select[b, h.shape[0] - 1] = True
        return self.t.model.forward_from(pad_hidden(hs), self.t.l0, memory=memory, select=select)

    def rows_for(self, batch: Batch) -> list[int]:
        """Preserve prompts routed to the batch's leaves first, then to its level-1 nodes, then any."""
        if self.data is None:
            raise RuntimeError("no preserve targets: build() has not run")
        paths, rng, want = self.data["paths"], self.t.rng, self.t.cfg.preserve_batch
        n = len(paths)
        leaves, tops = set(batch.paths), {p[0] for p in batch.paths}
        same_leaf = [i for i in range(n) if paths[i] in leaves]
        same_top = [i for i in range(n) if paths[i][0] in tops and i not in set(same_leaf)]
        rng.shuffle(same_leaf)
        rng.shuffle(same_top)
        rows = (same_leaf + same_top)[:want]
        if len(rows) < want:
            rows += rng.sample(range(n), min(n, want - len(rows)))
        return rows

    def loss(self, rows: list[int]) -> torch.Tensor:
        """Mean KL(anchor || anchor + memory) of the next token after each preserve prompt, through the
        prompts' paths (only the tree's blocks are held to the anchor; the generic memory is the storage
        control and trains on the documents alone)."""
        if self.data is None:
            raise RuntimeError("no preserve targets: build() has not run")
        memory = self.t.paths_memory([self.data["paths"][i] for i in rows], False)
        with self.t._autocast():
            logits = self._last_logits([self.data["hidden"][i] for i in rows], memory)
        logp = torch.log_softmax(logits.float(), -1)
        target = self.data["logp"][rows].float()
        return torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
