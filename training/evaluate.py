"""`hiermem eval longtail`: exact match by greedy generation, per popularity bucket and split, for the anchor
alone, the generic memory, the hierarchical memory, and the hierarchical memory with one level-1 subtree
deleted (memory_store.ops.delete_subtrees).

Greedy generation is checked by teacher forcing from one shared prefix cache (training/scoring.py), and
settled by real generation where greedy spells the answer with other tokens.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.corpus import Corpus
from training.general_use import general_use, rag_eval
from training.prefix import prefix_hidden
from training.reports import markdown, write_reports
from training.scoring import Item, greedy_correct, prepare_items

log = logging.getLogger(__name__)

SYSTEMS = ("anchor", "generic", "hierarchical", "hierarchical_deleted")


class BlockSource:
    """Blocks of a (possibly pruned) bank as float32 tensors, read once; absent nodes are skipped."""

    def __init__(self, bank) -> None:
        self.bank = bank
        self.cache: dict = {}

    def block(self, key: tuple[int, int]) -> torch.Tensor | None:
        """The block of node (level, index) as float32, None when the bank does not hold it."""
        from memory_store import NodeNotFound, NodeRef

        ref = NodeRef(int(key[0]), int(key[1]))
        if ref not in self.cache:
            try:
                self.cache[ref] = self.bank.read_block(ref).float()
            except NodeNotFound:
                self.cache[ref] = None
        return self.cache[ref]


def _acc(mask: np.ndarray, correct: np.ndarray) -> float | None:
    return float(correct[mask].mean()) if mask.any() else None


def summarize(items: list[Item], correct: dict[str, np.ndarray], deleted_subtree: int | None) -> dict:
    split = np.array([it.probe.split for it in items])
    bucket = np.array([it.probe.bucket for it in items])
    buckets = sorted(set(bucket.tolist()))
    out: dict = {"n": {"train": int((split == "train").sum()), "heldout": int((split == "heldout").sum())},
                 "accuracy": {}}
    for sys_name, c in correct.items():
        acc: dict = {}
        for sp in ("train", "heldout"):
            m = split == sp
            acc[sp] = {"all": _acc(m, c), **{str(b): _acc(m & (bucket == b), c) for b in buckets}}
        out["accuracy"][sys_name] = acc
    held = split == "heldout"
    known = held & correct["anchor"]
    out["heldout_anchor_known"] = int(known.sum())
    out["broken"] = {}
    for sys_name in ("generic", "hierarchical"):
        if sys_name in correct:
            broken = int((known & ~correct[sys_name]).sum())
            out["broken"][sys_name] = {"count": broken, "fraction": broken / max(1, int(known.sum()))}
    if "hierarchical" in correct:  # which facts, and where they route: the first thing to look at
        out["broken_facts"] = [{"prompt": it.probe.prompt, "answer": it.probe.answer,
                                "relation": it.probe.relation, "bucket": it.probe.bucket, "path": list(it.path)}
                               for k, it in enumerate(items) if known[k] and not correct["hierarchical"][k]]
    if deleted_subtree is not None and "hierarchical_deleted" in correct:
        inside = np.array([bool(it.path) and it.path[0] == deleted_subtree for it in items]) & (split == "train")
        rest = ~inside & (split == "train")
        out["deletion"] = {
            "subtree": int(deleted_subtree), "n_inside": int(inside.sum()), "n_rest": int(rest.sum()),
            "inside": {s: _acc(inside, correct[s]) for s in ("anchor", "hierarchical", "hierarchical_deleted")},
            "rest": {s: _acc(rest, correct[s]) for s in ("anchor", "hierarchical", "hierarchical_deleted")},
        }
    out["buckets"] = buckets
    return out


def evaluate_longtail(bank_dir: Path, corpus_dir: Path, anchor: str | None = None, out_dir: Path | None = None,
                      delete: int | None = None, batch_size: int = 64, limit: int = 0,
                      hidden_lookup=None, progress: bool = True, rag: tuple[int, ...] = (),
                      general: bool = True, dtype: str = "float32", chat: int = 0) -> dict:
    """Run the long-tail evaluation and write longtail.json / .md / .png into `out_dir` (default BANK/eval).

    Args:
        delete: level-1 subtree to delete for the deletion test (default: the one most trained facts route to).
        hidden_lookup: optional callable(list[Item], layer) -> list[tensor | None], prefix states already
            computed (the training job's cache); None entries are computed here.
        rag: also score the anchor with the top-k documents put before the prompt, for each k given.
        general: score memory auto against memory off on the general prompts (training/general_use.py).
        dtype: run the anchor as the model server does in this compute dtype (`lm.fast.prepare_for_inference`:
            "auto", "bfloat16" or "float32" = the plain float32 model, the default).
        chat: also the chat-level evaluation (training/chat_eval.py): every trained fact of the rarest bucket
            and this many cases of each other family, memory off / auto / retrieval side by side (0 = off).

    Prompts are routed as the model server routes them: through the bank's nearest-document router and
    its gate when the bank has one (a gated prompt gets no memory), else by the tree's descent.
    """
    from lm import load_anchor
    from memory_store import Bank, NodeRef
    from memory_store.ops import delete_subtrees
    from memory_store.router import DocRouter
    from training.routing import get_embedder

    t_start = time.perf_counter()
    bank_dir = Path(bank_dir)
    out_dir = Path(out_dir) if out_dir else bank_dir.parent / f"{bank_dir.name}-eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    bank = Bank.open(bank_dir)
    spec = bank.spec
    a = load_anchor(anchor or resolve_anchor(bank.anchor))
    if dict(a.identity) != bank.anchor.model_dump():
        raise ValueError(f"bank {bank_dir} was built for anchor {bank.anchor.hash[:12]}, "
                         f"{a.name} is {a.identity['hash'][:12]}")
    model, tok = a.model, a.tokenizer
    if dtype != "float32":
        from lm.fast import prepare_for_inference

        prepare_for_inference(model, dtype)
    layers = list(spec.memory_layers)
    l0 = min(layers)
    corpus = Corpus.load(Path(corpus_dir))
    probes = [p for p in corpus.probes if p.split in ("train", "heldout")]  # valid*: for choosing settings
    if limit:
        probes = probes[:limit]
    embedder = get_embedder(spec.embedder_name)
    router = DocRouter.load(bank_dir)
    paths = route_prompts(bank, router, [p.prompt for p in probes], embedder)
    items = prepare_items(tok, probes, paths)
    known: list[torch.Tensor | None] = hidden_lookup(items, l0) if hidden_lookup else [None] * len(items)
    todo = [i for i, h in enumerate(known) if h is None]
    t0 = time.perf_counter()
    computed = dict(zip(todo, prefix_hidden(model, [items[i].ids for i in todo], l0, progress=progress),
                        strict=True))
    hidden = [computed[i] if h is None else h for i, h in enumerate(known)]
    log.info("eval prefix states: %d computed in %.1fs, %d reused", len(todo), time.perf_counter() - t0,
             len(items) - len(todo))

    train_paths = [it.path[0] for it in items if it.probe.split == "train" and it.path]
    if delete is None and train_paths:
        delete = int(np.bincount(train_paths).argmax())
    sources: dict = {"hierarchical": BlockSource(bank)}
    generic = bank.generic_block()
    if generic is not None:
        sources["generic"] = generic.float()
    tmp = Path(tempfile.mkdtemp(prefix="deleted-", dir=out_dir))
    try:
        if delete is not None:
            delete_subtrees(bank_dir, [NodeRef(1, delete)], out=tmp / "bank")
            sources["hierarchical_deleted"] = BlockSource(Bank.open(tmp / "bank"))
        correct, fallbacks, seconds = {}, {}, {}
        systems = [s for s in SYSTEMS if s == "anchor" or s in sources]
        from training.progress import task

        bar = task("eval", len(systems) + len(rag) + int(general) + int(bool(chat)), "part", enabled=progress)
        for s in systems:
            bar.set_postfix_str(s)
            t0 = time.perf_counter()
            correct[s], fallbacks[s] = greedy_correct(model, tok, items, hidden, l0, s, sources, layers,
                                                      batch_size)
            seconds[s] = time.perf_counter() - t0
            log.info("eval %s: train %.3f heldout %.3f (%.1fs)", s,
                     correct[s][[it.probe.split == "train" for it in items]].mean(),
                     correct[s][[it.probe.split == "heldout" for it in items]].mean()
                     if any(it.probe.split == "heldout" for it in items) else float("nan"), seconds[s])
            bar.update()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = summarize(items, correct, delete)
    fact_paths = trained_paths(bank, router, corpus.docs, embedder)
    result["routing"] = routing_report(items, correct, fact_paths, "documents + gate" if router else "tree descent")
    if router is not None:
        result["routing"]["gate"] = {"min_idf": router.min_idf, "min_cos": router.min_cos,
                                     "calibration": router.calibration}
    cost = {"hierarchical": {"extra_prompt_tokens": 0.0, "ms_per_probe": 1000 * seconds["hierarchical"] / len(items)}}
    if rag:
        bar.set_postfix_str("retrieval")
        for k, (c, extra, sec) in rag_eval(model, tok, items, corpus.docs, embedder, rag, l0, layers,
                                           batch_size).items():
            correct[f"rag{k}"] = c
            cost[f"rag{k}"] = {"extra_prompt_tokens": extra, "ms_per_probe": 1000 * sec / len(items)}
        result.update({k: v for k, v in summarize(items, correct, delete).items() if k == "accuracy"})
        bar.update(len(rag))
    result["cost"] = cost
    if general:
        bar.set_postfix_str("general prompts")
        result["general"] = general_use(model, tok, a.chat_template, bank, router, embedder, sources, layers)
        bar.update()
    if chat:
        bar.set_postfix_str("chat replies")
        result["chat"] = run_chat_eval(model, tok, a.chat_template, router, embedder, corpus, sources, layers,
                                       chat)
        bar.update()
    bar.close()
    result["per_probe"] = [
        {"prompt": it.probe.prompt, "answer": it.probe.answer, "split": it.probe.split, "bucket": it.probe.bucket,
         "relation": it.probe.relation, "path": list(it.path), "reached": reached_fact(it, fact_paths),
         **{s: bool(c[k]) for s, c in correct.items()}} for k, it in enumerate(items)]
    result.update({"bank": str(bank_dir), "bank_id": bank.bank_id, "corpus": str(corpus_dir),
                   "anchor": a.name, "memory_layers": layers, "branching": spec.branching,
                   "ranks": spec.ranks, "generation_fallbacks": fallbacks, "seconds": seconds,
                   "wall_seconds": time.perf_counter() - t_start,
                   "fetched_params": spec.fetched_params, "bank_params": spec.bank_params,
                   "anchor_params": model.config.n_params})
    write_reports(result, out_dir)
    bank.close()
    return result


def run_chat_eval(model, tok, chat_template, router, embedder, corpus: Corpus, sources: dict, layers: list[int],
                  per_family: int) -> dict:
    """`chat_eval` of the corpus's rarest trained facts and `per_family` cases of each other family (the
    general prompts drawn from the evaluation half), through the hierarchical memory."""
    from training.chat_eval import chat_cases, chat_eval, sample_rows
    from training.corpus_docs import load_general_prompts
    from training.routing import embed

    general = sample_rows(load_general_prompts("eval"), per_family, np.random.default_rng(0))
    rarest = max((p.bucket for p in corpus.probes if p.split == "train"), default=0)
    cases = chat_cases(corpus.probes, general=general, per_family=per_family, full_buckets=[rarest])
    report = chat_eval(model, tok, chat_template, router, lambda xs: embed(xs, embedder), corpus.docs,
                       sources["hierarchical"].block, layers, cases)
    report["rarest_bucket"] = rarest
    return report


def route_prompts(bank, router, texts: list[str], embedder) -> list[tuple[int, ...]]:
    """Paths as the model server would choose them (() = no memory: the router's gate is closed)."""
    from training.routing import embed

    if router is not None:  # the whole prompt and each of its sentences, as the model server embeds them
        return [r.path or () for r in router.route_texts(texts, lambda xs: embed(xs, embedder))]
    return [tuple(int(x) for x in p) for p in bank.tree.route(embed(texts, embedder))]


def trained_paths(bank, router, docs: list[dict], embedder) -> dict[str, tuple[int, ...]]:
    """doc id -> the path its document was trained into (the router's record, else the tree's descent)."""
    if router is not None:
        return {d: tuple(int(x) for x in p) for d, p in zip(router.doc_ids, router.doc_paths, strict=True)}
    from training.routing import doc_route_texts, embed

    paths = bank.tree.route(embed(doc_route_texts(docs), embedder))
    return {d["id"]: tuple(int(x) for x in p) for d, p in zip(docs, paths, strict=True)}


def _fact_docs(it: Item) -> list[str]:
    return it.probe.doc_ids or ([it.probe.doc_id] if it.probe.doc_id else [])


def reached_fact(it: Item, fact_paths: dict[str, tuple[int, ...]]) -> bool | None:
    """Did the prompt reach a leaf trained on its fact? None for facts no document states."""
    ids = _fact_docs(it)
    if it.probe.split != "train" or not ids:
        return None
    return bool(it.path) and it.path in {fact_paths.get(d) for d in ids}


def routing_report(items: list[Item], correct: dict[str, np.ndarray], fact_paths: dict, router: str) -> dict:
    reached = [reached_fact(it, fact_paths) for it in items]
    train = np.array([r is not None for r in reached])
    ok = np.array([bool(r) for r in reached])
    level1 = np.array([r is not None and bool(it.path) and any(
        p and p[0] == it.path[0] for p in (fact_paths.get(d) for d in _fact_docs(it)))
        for r, it in zip(reached, items, strict=True)])
    gated = np.array([not it.path for it in items])
    held = np.array([it.probe.split == "heldout" for it in items])
    bucket = np.array([it.probe.bucket for it in items])
    out: dict = {"router": router, "reached": _acc(train, ok), "reached_level1": _acc(train, level1),
                 "gated_train": _acc(train, gated), "gated_heldout": _acc(held, gated), "accuracy_by_route": {}}
    for s, c in correct.items():
        out["accuracy_by_route"][s] = {"reached": _acc(train & ok, c), "missed": _acc(train & ~ok, c),
                                       "n_reached": int((train & ok).sum()), "n_missed": int((train & ~ok).sum())}
    if "hierarchical" in correct:
        c = correct["hierarchical"]
        out["by_bucket"] = {str(b): {"correct_reached": float((train & ok & c & (bucket == b)).sum())
                                     / max(1, int((train & (bucket == b)).sum()))} for b in sorted(set(bucket))}
        out["by_bucket"]["all"] = {"correct_reached": float((train & ok & c).sum()) / max(1, int(train.sum()))}
    return out


def resolve_anchor(identity) -> str:
    """The cached anchor (`$HIERMEM_HOME/anchors/*`) whose identity a bank names."""
    from lm.weights import anchors_dir

    for meta in sorted(anchors_dir().glob("*/hiermem.json")):
        if json.loads(meta.read_text()).get("identity", {}).get("hash") == identity.hash:
            return meta.parent.name if meta.parent.name in ("smollm2", "tiny") else str(meta.parent)
    raise ValueError(f"no cached anchor has identity {identity.hash[:12]}; pass --anchor")


def run_eval_command(args) -> int:
    result = evaluate_longtail(Path(args.bank), Path(args.corpus), anchor=args.anchor,
                               out_dir=Path(args.out) if args.out else None, delete=args.delete,
                               batch_size=args.batch_size, limit=args.limit,
                               rag=tuple(args.rag), general=not args.no_general,
                               dtype=getattr(args, "dtype", "float32"), chat=getattr(args, "chat", 0))
    print(markdown(result))
    return 0


__all__ = ["evaluate_longtail", "markdown", "run_eval_command", "summarize"]
