"""Two checks beside the long-tail accuracy: general use unharmed, and the retrieval baseline.

* `general_use`: a fixed set of everyday prompts and chat turns that are not about the corpus
  (training/prompts/general_prompts.jsonl, split "eval"). For each, the anchor's greedy continuation of 8
  tokens with memory off; then the same tokens teacher-forced through the model with the memory a request
  with ``"memory": "auto"`` would get. Greedy decoding with memory gives the same 8 tokens iff every
  argmax along that sequence is the off token, so one forward pass per prompt decides "identical", and the
  same pass gives KL(off || memory) of each next-token distribution. Three memories are scored: the gated
  router (what the model server does), the router's best path with the gate ignored (the gate's effect),
  and the tree's greedy descent (what routing did before the router).
* `rag_eval`: the anchor with the top-k documents (faiss over the same MiniLM embeddings) put before the
  prompt -- what a user would try instead of memories.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

N_TOKENS = 8


def _model_text(tok, chat_template, row: dict) -> str:
    if row.get("kind") == "chat" and chat_template:
        return tok.apply_chat_template([{"role": "user", "content": row["text"]}], add_generation_prompt=True,
                                       tokenize=False)
    return row["text"]


def general_use(model, tok, chat_template, bank, router, embedder, sources: dict, layers: list[int],
                prompts: list[dict] | None = None, batch_size: int = 16) -> dict:
    """Share of general prompts whose first 8 greedy tokens are unchanged by memory, and mean KL per position.

    Prompts go `batch_size` at a time: greedy decoding in one batch, then one right-padded forward per memory
    (a row's positions are exact under causal attention whatever the padding after it)."""
    from lm import MemoryBatch
    from lm.generate import default_eos_ids, greedy_batch
    from training.corpus_docs import load_general_prompts
    from training.data import pad_ids
    from training.routing import embed

    rows = prompts if prompts is not None else load_general_prompts("eval")
    texts = [r["text"] for r in rows]
    emb = embed(texts, embedder)
    choices: dict[str, list[tuple[int, ...]]] = {"tree descent": [tuple(int(x) for x in p)
                                                                for p in bank.tree.route(emb)]}
    if router is not None:  # embedded as the model server embeds a prompt (DocRouter.query_texts)
        bests = router.nearest(texts, lambda xs: embed(xs, embedder))
        choices["router, gate ignored"] = [b.path or () if b else () for b in bests]
        choices["auto (router + gate)"] = [router.gate(b).path or () for b in bests]
    stats: dict[str, dict[str, list]] = {name: {"identical": [], "kl": [], "memory": []} for name in choices}
    eos = default_eos_ids(model, tok)
    prompt_ids = [tok(_model_text(tok, chat_template, row), add_special_tokens=False)["input_ids"] for row in rows]
    with torch.no_grad():
        # memory off: greedy continuations of all prompts, decoded together (cut at EOS, as `generate` does)
        offs = []
        for cont in greedy_batch(model, prompt_ids, N_TOKENS, batch=batch_size):
            stop = next((k for k, t in enumerate(cont) if t in eos), len(cont))
            offs.append(cont[:stop])
        todo = [i for i, off in enumerate(offs) if off]
        for s in range(0, len(todo), batch_size):
            group = todo[s:s + batch_size]
            ids, _ = pad_ids([list(prompt_ids[i]) + list(offs[i]) for i in group])  # right padding: rows exact
            spans = [slice(len(prompt_ids[i]) - 1, len(prompt_ids[i]) - 1 + len(offs[i])) for i in group]
            logits_off = model(ids)
            logp_off = [torch.log_softmax(logits_off[b, sl].float(), -1) for b, sl in enumerate(spans)]
            for name, paths in choices.items():
                st = stats[name]
                memory = MemoryBatch.from_paths([list(enumerate(paths[i], start=1)) for i in group],
                                                sources["hierarchical"].block, layers)
                logits = model(ids, memory=memory) if memory is not None else None
                for b, (i, sl) in enumerate(zip(group, spans, strict=True)):
                    st["memory"].append(bool(paths[i]))
                    if logits is None or not paths[i]:
                        st["identical"].append(True)
                        st["kl"].append(0.0)
                        continue
                    logp = torch.log_softmax(logits[b, sl].float(), -1)
                    lo = logp_off[b]
                    st["identical"].append(bool((logp.argmax(-1) == torch.tensor(offs[i])).all()))
                    st["kl"].append(float((lo.exp() * (lo - logp)).sum(-1).mean()))
    systems: dict[str, dict[str, float]] = {}
    for name, st in stats.items():
        systems[name] = {"identical": float(np.mean(st["identical"])), "mean_kl": float(np.mean(st["kl"])),
                                "memory_share": float(np.mean(st["memory"]))}
    log.info("general use: %s", systems)
    return {"n": len(rows), "tokens": N_TOKENS, "systems": systems}


def top_documents(docs: Sequence[dict], queries: Sequence[str], embed: Callable[[list[str]], np.ndarray],
                  k: int) -> np.ndarray:
    """(len(queries), k) indices of each query's k nearest documents by cosine (faiss over the same embedder
    as routing; -1 where there are fewer than k): the retrieval baseline's search."""
    import faiss

    doc_emb = np.ascontiguousarray(embed([d["text"] for d in docs]), dtype=np.float32)
    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(doc_emb)
    _, top = index.search(np.ascontiguousarray(embed(list(queries)), dtype=np.float32), k)
    return top


def rag_eval(model, tok, items: list, docs: list[dict], embedder, ks: Sequence[int], l0: int, layers: list[int],
             batch_size: int = 64) -> dict[int, tuple[np.ndarray, float, float]]:
    """For each k: (correct[N], mean extra prompt tokens, seconds) of the anchor with the top-k documents before
    each prompt. Documents and prompts are embedded and searched once, for the largest k; that retrieval time
    is counted in every k's seconds."""

    from training.prefix import prefix_hidden
    from training.routing import embed
    from training.scoring import greedy_correct, prepare_items

    t_retrieve = time.perf_counter()
    top = top_documents(docs, [it.probe.prompt for it in items], lambda xs: embed(xs, embedder), max(ks))
    t_retrieve = time.perf_counter() - t_retrieve
    out = {}
    for k in ks:
        t0 = time.perf_counter()
        probes = []
        for it, ids in zip(items, top[:, :k], strict=True):
            context = "\n".join(docs[int(j)]["text"] for j in reversed(ids) if j >= 0)  # the best one nearest
            probes.append(dataclasses.replace(it.probe, prompt=context + "\n" + it.probe.prompt))
        rag_items = prepare_items(tok, probes, np.zeros((len(probes), 0), dtype=np.int64))
        hidden = prefix_hidden(model, [r.ids for r in rag_items], l0)
        correct, _ = greedy_correct(model, tok, rag_items, hidden, l0, "anchor", {}, layers, batch_size)
        extra = float(np.mean([r.n_prompt - it.n_prompt for r, it in zip(rag_items, items, strict=True)]))
        out[k] = (correct, extra, t_retrieve + time.perf_counter() - t0)
    return out
