"""Documents as training sequences: tokenise, choose the loss targets, pack by leaf.

`TrainingSet` builds a job's training sequences (the documents and the extra views of them that the
settings ask for, training/views.py) with their token ids, paths and loss targets. The prefix cache of
their frozen-anchor states is training/prefix.py's.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_DOC_TOKENS = 256


@dataclass
class Batch:
    doc_index: list[int]  # into the training sequences (`TrainingSet`; the first len(docs) are the documents)
    paths: list[tuple[int, ...]]  # each document's leaf path; documents of one leaf are adjacent


def tokenize_docs(tokenizer, texts: Sequence[str], max_tokens: int = MAX_DOC_TOKENS) -> list[list[int]]:
    """Token ids of each document (no special tokens: prompts at query time are tokenised the same way)."""
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        if len(ids) < 2:
            ids = list(ids) + [tokenizer.eos_token_id]
        out.append(list(ids[:max_tokens]))
    return out


def name_target_masks(tokenizer, texts: Sequence[str], names: Sequence[str | None],
                      token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per text, (len(token_ids[i]),) bool: False where the token covers part of a mention of `names[i]`
    (None: no name, all True). `token_ids` are `tokenize_docs`' (possibly cut short); a text whose tokens
    do not start with them keeps every token."""
    out = []
    for text, name, ids in zip(texts, names, token_ids, strict=True):
        keep = torch.ones(len(ids), dtype=torch.bool)
        if name:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if list(enc["input_ids"][:len(ids)]) == list(ids):
                spans = [(m.start(), m.end()) for m in re.finditer(re.escape(name), text)]
                for k, (a, b) in enumerate(enc["offset_mapping"][:len(ids)]):
                    keep[k] = not any(a < e and b > s for s, e in spans)
        out.append(keep)
    return out


def pad_ids(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and mask (B, T) (1 = real token). Right padding keeps every real position
    exact under causal attention, so no attention mask is needed."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, :len(s)] = True
    return ids, mask


def pad_hidden(hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, T, d) right-padded with zeros."""
    T = max(h.shape[0] for h in hs)
    out = hs[0].new_zeros(len(hs), T, hs[0].shape[1])
    for b, h in enumerate(hs):
        out[b, :h.shape[0]] = h
    return out


def leaf_batches(paths: np.ndarray, batch_size: int, seed: int, subtree: int | None = None) -> list[Batch]:
    """Documents packed by leaf: the leaves in a seeded random order, each leaf's documents together (in
    random order), cut into batches of `batch_size`. A batch thus spans one or a few leaves, so its rows
    share few distinct blocks (MemoryBatch computes each once) and its matmuls stay large enough.

    Args:
        paths: (N, depth) route of every document.
        subtree: keep only documents under this level-1 node.
    """
    rng = random.Random(seed)
    by_leaf: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        if subtree is None or int(p[0]) == subtree:
            by_leaf[tuple(int(x) for x in p)].append(i)
    leaves = sorted(by_leaf)
    rng.shuffle(leaves)
    order: list[tuple[int, tuple[int, ...]]] = []
    for leaf in leaves:
        docs = by_leaf[leaf]
        rng.shuffle(docs)
        order += [(i, leaf) for i in docs]
    return [Batch([i for i, _ in order[s:s + batch_size]], [p for _, p in order[s:s + batch_size]])
            for s in range(0, len(order), batch_size)]


def loss_starts(tokenizer, docs: Sequence[dict], token_ids: Sequence[Sequence[int]], mode: str) -> list[int]:
    """Index of the first token each document's loss covers: 1 (every next token) for mode "all"; for
    "continuation", the first token after the document's ``route_text`` when the text starts with it (the
    fact's object in the built-in corpus), else 1."""
    if mode in ("all", "surprising"):  # "surprising" selects positions later (prefix.surprising_positions)
        return [1] * len(docs)
    if mode != "continuation":
        raise ValueError(f"loss mode must be 'all' or 'continuation', got {mode!r}")
    out = []
    for d, ids in zip(docs, token_ids, strict=True):
        start = 1
        rt = d.get("route_text")
        if rt and d["text"].startswith(rt):
            pre = tokenizer(rt, add_special_tokens=False)["input_ids"]
            if list(ids[:len(pre)]) == list(pre) and len(pre) < len(ids):
                start = max(1, len(pre))
        out.append(start)
    return out


def loss_targets(ids: torch.Tensor, mask: torch.Tensor, starts: Sequence[int]):
    """(select (B, T) bool, targets (N,)): the positions whose next token is a loss target, and that token.
    Position t predicts token t+1; a row's loss covers tokens starts[b] .. its last real token."""
    B, T = ids.shape
    t = torch.arange(T)
    first = torch.as_tensor(list(starts), dtype=torch.long)[:, None] - 1  # (B, 1)
    nxt_real = torch.zeros_like(mask)
    nxt_real[:, :-1] = mask[:, 1:]
    select = nxt_real & (t[None, :] >= first)  # (B, T)
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    return select, nxt[select]


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TrainingSet:
    """A job's training sequences: the documents (with ``name_anaphors``, their training view), then
    ``permuted_views`` copies of each with its sentences reordered, then the ``pronoun_views`` (one per document
    whose later sentences open with its name), each on its document's path; sequence i < len(docs) is
    document i. Per sequence: its token ids, the first token its loss covers, and with ``skip_name_targets``
    the tokens it may target (every token but the mentions of its document's subject)."""

    def __init__(self, tokenizer, docs: Sequence[dict], paths: np.ndarray, *, loss: str = "all",
                 name_anaphors: bool = False, permuted_views: int = 0, pronoun_views: bool = False,
                 skip_name_targets: bool = False, seed: int = 0) -> None:
        from training import views

        trained = list(docs)
        names = views.subject_names(docs) if name_anaphors or pronoun_views or skip_name_targets else []
        if name_anaphors:  # the training view only; routing and preservation use the documents as written
            trained = [{**d, "text": views.name_anaphors(d["text"], n)} for d, n in zip(docs, names, strict=True)]
        extra: list[tuple[list[dict], list[int]]] = []
        if permuted_views > 0:
            extra.append(views.permuted_views(trained, permuted_views, seed))
        if pronoun_views:
            extra.append(views.pronoun_views(trained, names))
        self.paths = paths  # (N, depth): each sequence's path
        self.doc_of = list(range(len(docs)))  # the document each sequence comes from
        seq_names = list(names)  # the subject of every sequence (with skip_name_targets)
        for more, of in extra:
            trained = trained + more
            self.doc_of += list(of)
            seq_names += [names[i] for i in of] if names else []
            if of:
                self.paths = np.concatenate([self.paths, paths[of]])
        self.texts = [d["text"] for d in trained]
        self.token_ids = tokenize_docs(tokenizer, self.texts, MAX_DOC_TOKENS)
        self.target_keep = (name_target_masks(tokenizer, self.texts, seq_names, self.token_ids)
                            if skip_name_targets else None)  # per sequence (T_i,) bool; None: every token
        self.loss_start = loss_starts(tokenizer, trained, self.token_ids, loss)

    def __len__(self) -> int:
        return len(self.token_ids)

    def n_tokens(self, idx: Sequence[int]) -> int:
        return sum(len(self.token_ids[i]) for i in idx)

    def loss_select(self, idx: Sequence[int], ids: torch.Tensor, mask: torch.Tensor,
                    surprising: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T) bool: the positions of the padded sequences `ids` (sequences `idx`) whose next token is a
        loss target; with `surprising` (per sequence, training/prefix.py), only among those positions."""
        select, _ = loss_targets(ids, mask, [self.loss_start[i] for i in idx])
        if surprising is not None:  # only the positions where the anchor was most surprised
            keep = torch.zeros_like(select)
            for b, i in enumerate(idx):
                keep[b, :len(surprising[i])] = surprising[i]
            select = select & keep
        if self.target_keep is not None:  # position t predicts token t + 1: not the subject's name
            keep = torch.ones_like(select)
            for b, i in enumerate(idx):
                keep[b, :len(self.target_keep[i]) - 1] = self.target_keep[i][1:]
            select = select & keep
        return select
