"""Choose the context-distillation mix on the validation chat wordings (issue 28).

`--distill-weight` (training/distill.py) mixes the documents' next-token loss with the KL to the teacher
that read the document. The mix is chosen here, on a family of chat wordings used nowhere else
(`chat_forms.VALIDATION_QUESTIONS` / `VALIDATION_FORMS`): neither the gate's calibration, nor the
distillation prompts, nor the chat evaluation's test wordings (`bench/results/longtail-chat.*`) see them.

A subset of the documents corpus (`--sizes`, the `docs` preset's training settings, no generic control) is
trained once per weight into `WORK/w<weight>/{job,bank}` (kept: a rerun evaluates what is there), then every
trained subject is asked in the validation wordings: one question per trained fact, one free-form request
per trained subject, plus held-out subjects and general prompts. The chosen weight maximises the share of
*good* replies (answer contained, no repeated 4-gram, subject intact where named; `chat_eval.score`) over the
trained questions and free-form requests with memory auto; a tie goes to the smaller weight (cheaper to
train).

    python -m bench.chat_mix --work data/chat-mix --weights 0,1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from bench.common import markdown_table, write_results

log = logging.getLogger(__name__)

DEFAULT_SIZES = {"city_country": 60, "us_city_state": 15, "country_capital": 12, "element_number": 9}
"""A fifth of the `docs` preset's entities per relation (77 trained in 200 documents at seed 0)."""

SCORED = ("trained", "free")
"""The validation families the choice is made on (held-out and general replies are reported beside)."""


def train_weight(corpus_dir: Path, out: Path, weight: float, distill_batch: int, threads: str) -> dict:
    """Train (or find trained) the subset at one distillation weight; returns the job's record."""
    from training.config import TrainConfig
    from training.pipeline import PRESETS
    from training.trainer import train

    job = out / "job" / "job.json"
    if job.exists() and json.loads(job.read_text()).get("done"):
        cfg = json.loads((out / "job" / "config.json").read_text())
        if float(cfg.get("distill_weight", 0.0)) != weight:
            raise SystemExit(f"{out}: a job trained at distill_weight {cfg.get('distill_weight')}, not {weight}")
        return json.loads(job.read_text())
    settings = {**PRESETS["docs"]["train"], "generic_prob": 0.0}
    cfg = TrainConfig(corpus=str(corpus_dir), out=str(out / "job"), bank=str(out / "bank"), threads=threads,
                      progress=False, distill_weight=weight, distill_batch=distill_batch, **settings)
    return train(cfg)


def evaluate_weight(corpus_dir: Path, bank_dir: Path, per_family: int) -> dict:
    import numpy as np

    from lm import load_anchor
    from memory_store import Bank
    from memory_store.router import DocRouter
    from training.chat_eval import chat_cases, chat_eval, sample_rows
    from training.corpus import Corpus
    from training.corpus_docs import load_general_prompts
    from training.evaluate import BlockSource, resolve_anchor
    from training.routing import embed, get_embedder

    corpus = Corpus.load(corpus_dir)
    general = sample_rows(load_general_prompts("valid"), per_family, np.random.default_rng(1))
    cases = chat_cases(corpus.probes, general=general, per_family=per_family, validation=True, seed=1)
    with Bank.open(bank_dir) as bank:
        anchor = load_anchor(resolve_anchor(bank.anchor))
        embedder = get_embedder(bank.spec.embedder_name)
        return chat_eval(anchor.model, anchor.tokenizer, anchor.chat_template, DocRouter.load(bank.dir),
                         lambda xs: embed(xs, embedder), corpus.docs, BlockSource(bank).block,
                         list(bank.spec.memory_layers), cases, samples=6)


def good_share(report: dict) -> float:
    """Share of good auto replies over the scored families, weighted by their sizes."""
    fams = [report["families"][f] for f in SCORED if f in report["families"]]
    n = sum(f["n"] for f in fams)
    return sum(f["n"] * (f["systems"]["auto"]["good"] or 0.0) for f in fams) / n if n else 0.0


def choose(results: dict[float, dict]) -> float:
    """The weight with the most good replies; the smaller weight on a tie."""
    return max(sorted(results), key=lambda w: (round(good_share(results[w]), 6), -w))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="work directory (corpus, one job and bank per weight)")
    ap.add_argument("--weights", default="0,1", help="distillation weights to compare")
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--per-family", type=int, default=40, help="validation cases per family (0: all)")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--name", default="chat-mix")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training.corpus_docs import build_documents_corpus

    work = Path(args.work)
    corpus_dir = work / "corpus"
    if not (corpus_dir / "probes.jsonl").exists():
        build_documents_corpus(DEFAULT_SIZES, heldout_fraction=0.2, heldout_extra=0.75, seed=0).save(corpus_dir)
    weights = [float(w) for w in args.weights.split(",") if w]
    results, jobs = {}, {}
    for w in weights:
        out = work / f"w{w:g}"
        t0 = time.perf_counter()
        jobs[w] = train_weight(corpus_dir, out, w, args.distill_batch, args.threads)
        log.info("weight %g: job ready in %.0fs", w, time.perf_counter() - t0)
        results[w] = evaluate_weight(corpus_dir, out / "bank", args.per_family)
    best = choose(results)
    rows = []
    for w in weights:
        for fam in ("trained", "free", "heldout", "general"):
            if fam not in results[w]["families"]:
                continue
            f = results[w]["families"][fam]
            a = f["systems"]["auto"]
            rows.append({"distill weight": w, "family": fam, "n": f["n"], "memory used": f["memory_used"],
                         "contained": a["contained"], "repeated 4-gram": a["repeated"], "intact": a["intact"],
                         "good": a["good"], "unchanged from off": a["unchanged"]})
    summary = [{"distill weight": w, "good (trained + free)": round(good_share(results[w]), 4),
                "train seconds": jobs[w].get("train_seconds"), "steps": jobs[w].get("steps")} for w in weights]
    from training.chat_eval import chat_markdown

    tables = ("Validation chat wordings only (training/chat_forms.py `VALIDATION_*`); memory auto.\n\n"
              + markdown_table(summary) + "\n" + markdown_table(rows) + f"\n**Chosen: distill weight {best:g}**\n\n"
              + "\n".join(f"## weight {w:g}\n\n" + chat_markdown({k: v for k, v in results[w].items()
                                                                   if k != "per_case"}) for w in weights))
    figures = {"weights": weights, "chosen": best, "summary": summary,
               "reports": {str(w): results[w] for w in weights}, "sizes": DEFAULT_SIZES}
    write_results(args.name, figures, [], tables)
    print(json.dumps(summary, indent=2), "\nchosen", best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
