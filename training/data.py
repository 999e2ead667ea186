"""Documents as training batches: tokenise, route, cache the frozen prefix, pack by leaf.

The prefix cache: with a frozen anchor and memory only in layers >= L0, the residual stream entering layer
L0 does not depend on anything we train, so it is computed once per document (``Transformer.hidden_at``)
and every step runs only layers L0.. and the head (``Transformer.forward_from``). Exact, not approximate:
tests/training/test_trainer.py checks loss and gradients against the uncached model.
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
    doc_index: list[int]  # into the document list
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


@torch.no_grad()
def prefix_hidden(model, token_ids: Sequence[Sequence[int]], layer: int, batch_size: int = 64,
                  progress: bool = False) -> list[torch.Tensor]:
    """Residual stream entering `layer` for each sequence, unpadded: list of (T_i, d) float32 tensors."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out: dict[int, torch.Tensor] = {}
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"prefix cache (layers 0..{layer - 1})", unit="batch")
    for s in starts:
        idx = order[s:s + batch_size]
        ids, _ = pad_ids([token_ids[i] for i in idx])
        h = model.hidden_at(ids, layer)  # (B, T, d)
        for b, i in enumerate(idx):
            out[i] = h[b, :len(token_ids[i])].clone()
    return [out[i] for i in range(len(token_ids))]


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
    if mode in ("all", "surprising"):  # "surprising" selects positions later (Trainer.build_surprising)
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
