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
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import Batch, atomic_save, pad_hidden, tokenize_docs
from training.prefix import prefix_hidden
from training.views import document_frequency

log = logging.getLogger(__name__)

_NAME = re.compile(r"\b[A-Z][\w'\-]*(?:\s+[A-Z][\w'\-]*)*")


def document_name(text: str, rare: set[str]) -> str | None:
    """The first capitalised name of `text` made of words that are rare in the corpus (e.g. an entity)."""
    for m in _NAME.finditer(text):
        name = m.group(0)
        if all(w.lower() in rare for w in name.split()):
            return name
    return None


def document_names(docs: Sequence[dict], max_df: int = 4) -> list[str | None]:
    """`document_name` of each document, "rare" meaning in at most `max_df` documents of this corpus."""
    df = document_frequency(docs)
    rare = {w for w, n in df.items() if n <= max_df and w.isalpha()}
    return [document_name(d["text"], rare) for d in docs]


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




@dataclass
class PreserveSource:
    """Where a job's preservation prompts come from: the corpus's preserve.jsonl `rows` (``{"prompt"}``),
    routed as a prompt would be (embedded by `embed`, as the tree's documents were, then through the job's
    router in `router_dir`, else the `tree`'s descent); without rows, `per_doc` prompts derived from each of
    the `docs` (`derive_preserve_prompts`, seeded), on the document's path in `doc_paths`."""

    rows: list[dict]
    docs: Sequence[dict]
    doc_paths: np.ndarray
    tree: Any
    router_dir: Path
    embed: Callable[[list[str]], np.ndarray]
    per_doc: int = 1
    seed: int = 0

    def prompts(self) -> tuple[list[str], list[tuple[int, ...]], str]:
        """(prompts, the path of each, where they came from)."""
        if self.rows:
            prompts = [r["prompt"] for r in self.rows]
            return prompts, [tuple(int(x) for x in p) for p in self._route(prompts)], "preserve.jsonl"
        derived = derive_preserve_prompts(self.docs, self.doc_paths, per_doc=self.per_doc, seed=self.seed)
        return [r["prompt"] for r in derived], [tuple(r["path"]) for r in derived], "derived from the documents"

    def _route(self, prompts: list[str]) -> list:
        from memory_store.router import DocRouter

        router = DocRouter.load(self.router_dir)
        if router is None:
            return list(self.tree.route(self.embed(prompts)))
        # where each prompt would go if the gate let it through (embedded as the model server embeds it):
        # the leaves it could harm; the tree's descent for a prompt without any candidate
        bests = router.nearest(prompts, self.embed)
        missing = [p for p, b in zip(prompts, bests, strict=True) if b is None]
        descent = iter(self.tree.route(self.embed(missing)) if missing else [])
        return [b.path if b is not None else next(descent) for b in bests]


class Preservation:
    """The preservation prompts of one training job: their prefix states (entering `layer`, the first memory
    layer), the frozen anchor's log-probabilities after them (the KL targets, kept in `cache_file`), their
    paths, and the loss.

    Args:
        memory_for: paths -> the `lm.MemoryBatch` of the tree's blocks on those paths.
        autocast: a new context for each training forward (`training.compute.Compute.autocast`).
        rng: the job's random stream (which prompts a step takes).
        per_step: prompts per step (``--preserve-batch``).
    """

    def __init__(self, source: PreserveSource, *, model, tokenizer, layer: int,
                 memory_for: Callable[[list[tuple[int, ...]]], Any],
                 autocast: Callable[[], AbstractContextManager], rng: random.Random, per_step: int,
                 cache_file: Path, subtree: int | None = None) -> None:
        self.source = source
        self.subtree = subtree  # a subtree job holds only that level-1 node's blocks: no prompt routed elsewhere
        self.model, self.tokenizer, self.layer = model, tokenizer, layer
        self.memory_for, self.autocast, self.rng, self.per_step = memory_for, autocast, rng, per_step
        self.cache_file = cache_file
        self.data: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.data is not None and len(self.data["paths"]) > 0

    def build(self) -> None:
        if self.cache_file.exists():
            self.data = torch.load(self.cache_file)
            return
        t0 = time.perf_counter()
        prompts, paths, source = self.source.prompts()
        if not prompts:
            self.data = {"hidden": [], "paths": [], "logp": torch.zeros(0)}
            return
        hidden = prefix_hidden(self.model, tokenize_docs(self.tokenizer, prompts), self.layer)
        targets = []
        with torch.no_grad():
            for s in range(0, len(hidden), 64):
                targets.append(torch.log_softmax(self._last_logits(hidden[s:s + 64], None).float(), -1)
                               .to(torch.float16))
        self.data = {"hidden": hidden, "paths": paths, "logp": torch.cat(targets), "source": source}
        atomic_save(self.data, self.cache_file)
        log.info("preserve targets for %d prompts (%s) in %.1fs", len(hidden), source, time.perf_counter() - t0)

    def _last_logits(self, hs: list[torch.Tensor], memory) -> torch.Tensor:
        select = torch.zeros(len(hs), max(h.shape[0] for h in hs), dtype=torch.bool)
        for b, h in enumerate(hs):
            select[b, h.shape[0] - 1] = True
        return self.model.forward_from(pad_hidden(hs), self.layer, memory=memory, select=select)

    def rows_for(self, batch: Batch) -> list[int]:
        """Preserve prompts routed to the batch's leaves first, then to its level-1 nodes, then any."""
        if self.data is None:
            raise RuntimeError("no preserve targets: build() has not run")
        paths, rng, want = self.data["paths"], self.rng, self.per_step
        n = len(paths)
        leaves, tops = set(batch.paths), {p[0] for p in batch.paths}
        same_leaf = [i for i in range(n) if paths[i] in leaves]
        same_top = [i for i in range(n) if paths[i][0] in tops and i not in set(same_leaf)]
        rng.shuffle(same_leaf)
        rng.shuffle(same_top)
        rows = (same_leaf + same_top)[:want]
        if len(rows) < want:
            pool = range(n) if self.subtree is None else [i for i in range(n) if paths[i][0] == self.subtree]
            rows += rng.sample(pool, min(len(pool), want - len(rows)))
        return rows

    def loss(self, rows: list[int]) -> torch.Tensor:
        """Mean KL(anchor || anchor + memory) of the next token after each preserve prompt, through the
        prompts' paths (only the tree's blocks are held to the anchor; the generic memory is the storage
        control and trains on the documents alone)."""
        if self.data is None:
            raise RuntimeError("no preserve targets: build() has not run")
        memory = self.memory_for([self.data["paths"][i] for i in rows])
        with self.autocast():
            logits = self._last_logits([self.data["hidden"][i] for i in rows], memory)
        logp = torch.log_softmax(logits.float(), -1)
        target = self.data["logp"][rows].float()
        return torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
