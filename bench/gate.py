"""The routing gate asked as people ask: how often a question or request about a trained subject gets its
memory, and how often one about anything else does (issue 28, docs/training.md "People's questions").

    python -m bench.gate [--corpus DIR]

On the `docs` preset's corpus (built when --corpus is not given), the router is built and its gate calibrated
twice, as `hiermem train` does: with the corpus's `valid` probes, and as a user's corpus without them (no
`valid` / `valid_heldout` split: only documents). Each is then asked, one message at a time as the model
server routes a chat request, the chat family of training/chat_forms.py (nothing is calibrated on it):

* `chat`: per trained subject its relation's chat question ("Which US state is DeBary in?");
* `free`: per trained subject every free-form request ("Tell me about X.", a two-sentence travel message);
* the same about held-out subjects (no document), and the general test prompts (completions, chat turns).

"open" is the share given memory; "reach" the share given the path of a document about the subject.
Results: bench/results/gate-<kind>.{json,md}; `--kind airports` asks the same of airports named by IATA
codes (training/corpus_codes.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, target, write_results  # noqa: E402


def measure(router, embed, docs, paths, probes, general: list[str]) -> dict:
    from training.chat_forms import CHAT_QUESTIONS, FREE_FORMS

    where = {d["id"]: tuple(int(x) for x in p) for d, p in zip(docs, paths, strict=True)}
    firsts: dict = {}
    for p in probes:
        if p.split in ("train", "heldout") and p.relation in CHAT_QUESTIONS:
            firsts.setdefault((p.split, p.entity), p)
    out = {}
    for split in ("train", "heldout"):
        ents = [p for (s, _), p in firsts.items() if s == split]
        fams = {"chat": [(CHAT_QUESTIONS[p.relation].format(name=p.entity), p) for p in ents],
                "free": [(f.format(name=p.entity), p) for p in ents for f in FREE_FORMS]}
        for fam, rows in fams.items():
            routes = router.route_texts([t for t, _ in rows], embed)
            reach = [r.path is not None and r.path in {where[d] for d in p.doc_ids if d in where}
                     for r, (_, p) in zip(routes, rows, strict=True)]
            closed = [t for r, (t, _) in zip(routes, rows, strict=True) if r.path is None]
            out[f"{split} {fam}"] = {"n": len(rows), "open": float(np.mean([r.path is not None for r in routes])),
                                     "reach": float(np.mean(reach)) if split == "train" else None,
                                     "closed_examples": closed[:5]}
    routes = router.route_texts(general, embed)
    out["general"] = {"n": len(general), "open": float(np.mean([r.path is not None for r in routes])),
                      "reach": None, "closed_examples": []}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="a documents corpus (default: build the --kind one)")
    ap.add_argument("--kind", default="docs", choices=["docs", "airports"],
                    help="docs: the docs preset's corpus; airports: airports named by IATA codes "
                         "(training/corpus_codes.py), a corpus no setting was chosen on")
    ap.add_argument("--name", default=None, help="results name (default gate-<kind>)")
    args = ap.parse_args(argv)
    from training.config import TrainConfig
    from training.corpus import Corpus
    from training.corpus_docs import build_documents_corpus, load_general_prompts
    from training.pipeline import PRESETS
    from training.routing import (
        build_corpus_tree,
        embed,
        get_embedder,
        group_documents,
        group_paths,
        make_router,
    )

    t0 = time.perf_counter()
    if args.corpus:
        corpus = Corpus.load(Path(args.corpus))
    elif args.kind == "airports":
        from training.corpus_codes import build_airports_corpus

        corpus = build_airports_corpus()
    else:
        spec = dict(PRESETS["docs"]["corpus"])
        spec.pop("style")
        with tempfile.TemporaryDirectory() as tmp:
            build_documents_corpus(**spec).save(Path(tmp))
            corpus = Corpus.load(Path(tmp))
    embedder = get_embedder()
    emb = embed([d["text"] for d in corpus.docs], embedder)
    tree = build_corpus_tree(emb, TrainConfig().branching)
    paths = group_paths(tree, emb, group_documents([d["text"] for d in corpus.docs]))
    general = [r["text"] for r in load_general_prompts("eval")]
    figures: dict = {"n_docs": len(corpus.docs), "cases": {}}
    user_probes = [p for p in corpus.probes if p.split not in ("valid", "valid_heldout")]
    cases = [("a user's corpus (documents only)", user_probes)]
    if len(user_probes) < len(corpus.probes):
        cases.insert(0, ("with valid probes", corpus.probes))
    for name, probes in cases:
        router = make_router(corpus.docs, paths, embedder, probes)
        figures["cases"][name] = {"calibration": router.calibration,
                                  "families": measure(router, lambda xs: embed(xs, embedder), corpus.docs, paths,
                                                      corpus.probes, general)}
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    rows = []
    for name, case in figures["cases"].items():
        for fam, v in case["families"].items():
            rows.append({"gate calibrated": name, "asked": fam, "n": v["n"], "memory used %": f"{100 * v['open']:.1f}",
                         "reached its subject's leaf %": "-" if v["reach"] is None else f"{100 * v['reach']:.1f}"})
    targets = []
    for name, case in figures["cases"].items():
        f = case["families"]
        targets += [target(f"{name}: chat questions about trained subjects given memory", f["train chat"]["open"],
                           ">=", 0.95),
                    target(f"{name}: free-form requests about trained subjects given memory", f["train free"]["open"],
                           ">=", 0.80),
                    target(f"{name}: chat questions about held-out subjects given memory",
                           f["heldout chat"]["open"], "<=", 0.05),
                    target(f"{name}: general test prompts given memory", f["general"]["open"], "<=", 0.02)]
    write_results(args.name or f"gate-{args.kind}", figures, targets, markdown_table(rows))
    print(markdown_table(rows))
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
