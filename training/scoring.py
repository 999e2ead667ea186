"""Scoring a probe the way greedy generation would, shared by the long-tail evaluation (training/evaluate.py),
the retrieval baseline (training/general_use.py) and the choice of the blocks' output scale
(training/scale.py).

Greedy decoding is deterministic, so "the greedy continuation of the prompt starts with the answer's tokens
a_1..a_A followed by a word boundary" holds iff the argmax after prompt + a_<j is a_j for every j, and the
argmax after prompt + answer is not a letter or digit gluing onto the answer. One forward pass over
prompt + answer gives all of these argmaxes at once (teacher forcing), for every system, from one shared
prefix cache (layers below the first memory layer see no memory). The one case this cannot decide --
greedy picks a different tokenisation of the same text (argmax is a prefix of the remaining answer) -- is
settled by real token-by-token generation (`lm.generate`) with the row's memory; tests check both paths
against `lm.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.corpus import Probe
from training.data import pad_hidden, pad_ids


@dataclass
class Item:
    probe: Probe
    ids: list[int]  # prompt + answer tokens
    n_prompt: int
    n_answer: int
    path: tuple[int, ...]


def prepare_items(tokenizer, probes: list[Probe], paths: Sequence[Sequence[int]] | np.ndarray) -> list[Item]:
    items = []
    for p, path in zip(probes, paths, strict=True):
        pre = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(p.prompt + p.answer, add_special_tokens=False)["input_ids"]
        if list(full[:len(pre)]) != list(pre) or len(full) == len(pre):
            full = list(pre) + list(tokenizer(p.answer, add_special_tokens=False)["input_ids"])
        items.append(Item(p, list(full), len(pre), len(full) - len(pre), tuple(int(x) for x in path)))
    return items


def _is_boundary(tokenizer, tok: int, eos: set[int]) -> bool:
    if tok in eos:
        return True
    text = tokenizer.decode([tok])
    return not text or not text[0].isalnum()


def text_match(generated: str, answer: str) -> bool:
    """Exact match: the generation starts with the answer (leading spaces ignored), then a word boundary."""
    g, a = generated.lstrip(), answer.strip()
    return g.startswith(a) and (len(g) == len(a) or not g[len(a)].isalnum())


def _memory_for(rows: list[Item], system: str, sources: dict, layers: list[int]):
    from lm import MemoryBatch

    if system == "anchor":
        return None
    if system == "generic":
        return MemoryBatch.build([sources["generic"]], [[0]] * len(rows), layers)
    src = sources[system]
    return MemoryBatch.from_paths([list(enumerate(it.path, start=1)) for it in rows], src.block, layers)


def greedy_correct(model, tokenizer, items: list[Item], hidden: list[torch.Tensor], l0: int, system: str,
                   sources: dict, layers: list[int], batch_size: int = 64) -> tuple[np.ndarray, int]:
    """(correct[N] bool, number of rows settled by real generation) for one system."""
    from lm import MemoryBatch, SamplingParams, generate
    from lm.generate import default_eos_ids

    eos = default_eos_ids(model, tokenizer)
    correct = np.zeros(len(items), dtype=bool)
    order = sorted(range(len(items)), key=lambda i: (items[i].path, len(items[i].ids)))
    fallbacks = 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [items[i] for i in idx]
        ids, _ = pad_ids([r.ids for r in rows])
        select = torch.zeros(ids.shape, dtype=torch.bool)
        for b, r in enumerate(rows):
            select[b, r.n_prompt - 1:r.n_prompt + r.n_answer] = True  # A answer predictions + the boundary
        memory = _memory_for(rows, system, sources, layers)
        with torch.no_grad():
            pred = model.forward_from(pad_hidden([hidden[i] for i in idx]), l0, memory=memory,
                                      select=select).argmax(-1)
        pos = 0
        for i, r in zip(idx, rows, strict=True):
            p = pred[pos:pos + r.n_answer + 1].tolist()
            pos += r.n_answer + 1
            answer = r.ids[r.n_prompt:]
            j = next((k for k in range(r.n_answer) if p[k] != answer[k]), None)
            if j is None:
                correct[i] = _is_boundary(tokenizer, p[-1], eos)
                continue
            rest = tokenizer.decode(answer[j:])
            alt = tokenizer.decode([p[j]])
            if not alt.strip() or not rest.startswith(alt):
                continue  # greedy leaves the answer here: wrong
            # greedy spells the answer with other tokens: generate for real to settle it
            fallbacks += 1
            mem1 = None
            if memory is not None:
                blocks = (_memory_for([r], system, sources, layers))
                mem1 = blocks if isinstance(blocks, MemoryBatch) else None
            params = SamplingParams(max_new_tokens=r.n_answer + 4, temperature=0.0)
            out = generate(model, tokenizer, r.ids[:r.n_prompt], params, memory=mem1)
            correct[i] = text_match(out.text, r.probe.answer)
    return correct, fallbacks
