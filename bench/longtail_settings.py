"""Choosing the `docs` preset's training settings on validation wordings, never on the test probes.

Trains memories on a subset of the documents corpus's trained facts (their documents only) with each
variant of the settings, then scores the facts' ``valid`` probes -- a third family of wordings, disjoint from
the documents' and the test probes' (training/corpus_docs.py) -- greedily, each through the blocks of its
fact's first document's path (routing is measured apart, by bench/longtail_docs.py). "fit" scores the same
facts in the documents' own words (a document sentence cut before the answer): what the blocks stored, as
against what they answer in other words. "valid_scaled" is the valid figure at the output scale the trainer
chose on these same probes (training/scale.py): optimistic as an absolute figure, fair between variants.
The generic control and preservation are left out to keep each variant to a few minutes; they are the same
for every variant (`preset-batch4-preserve` alone adds the
full preset's former derived preservation, to measure what it cost).

    python -m bench.longtail_settings                           # the old presets and the chosen one, 120 facts
    python -m bench.longtail_settings --facts 60 --variants old,batch8,lr3e-2,epochs30

`preset` is the `docs` preset the first settings round chose (8 documents per step) and the base of the
`preset-*` variants; `preset-batch4-from4` is the preset now (training/pipeline.py), chosen from those variants
after `preset-batch4` (the rounds, with their dates and figures: docs/training.md, "Documents as users write
them").
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, write_results  # noqa: E402

OLD = {"memory_layers": [26, 27, 28, 29], "batch_size": 32, "lr": 1e-2}
SPREAD = [8, 12, 16, 20, 24, 28]
VARIANTS: dict[str, dict] = {
    "old": OLD,
    "batch8": {**OLD, "batch_size": 8},
    "lr3e-2": {**OLD, "lr": 3e-2},
    "lr5e-2": {**OLD, "lr": 5e-2},
    "epochs30": {**OLD, "epochs": 30},
    "batch8-lr3e-2": {**OLD, "batch_size": 8, "lr": 3e-2},
    "batch16-lr3e-2": {**OLD, "batch_size": 16, "lr": 3e-2},
    "batch8-lr2e-2": {**OLD, "batch_size": 8, "lr": 2e-2},
    "batch8-lr2e-2-last6": {**OLD, "batch_size": 8, "lr": 2e-2, "memory_layers": list(range(24, 30))},
    "batch8-lr2e-2-epochs15": {**OLD, "batch_size": 8, "lr": 2e-2, "epochs": 15},
    "batch8-lr2e-2-from12": {**OLD, "batch_size": 8, "lr": 2e-2, "memory_layers": SPREAD[1:]},
    "preset": {"memory_layers": SPREAD, "batch_size": 8, "lr": 2e-2},
}
PRESET = VARIANTS["preset"]
VARIANTS.update({
    "preset-leaflr4": {**PRESET, "level_lr": [1.0, 4.0]},
    "preset-batch4": {**PRESET, "batch_size": 4},
    "preset-ranks64": {**PRESET, "ranks": [64, 64]},
    "preset-batch4-ranks64": {**PRESET, "batch_size": 4, "ranks": [64, 64]},
    "preset-batch4-ranks64-epochs8": {**PRESET, "batch_size": 4, "ranks": [64, 64], "epochs": 8},
    "preset-batch4-ranks128-64": {**PRESET, "batch_size": 4, "ranks": [128, 64]},
    "preset-batch4-anaphors": {**PRESET, "batch_size": 4, "name_anaphors": True},
    # the full preset's derived preservation (the other variants train without it): what it costs in recall
    "preset-batch4-preserve": {**PRESET, "batch_size": 4, "preserve_weight": 1.0, "preserve_batch": 8},
    "preset-batch4-epochs13": {**PRESET, "batch_size": 4, "epochs": 13},
    "preset-batch2": {**PRESET, "batch_size": 2},
    "preset-batch4-lr1e-2": {**PRESET, "batch_size": 4, "lr": 1e-2},
    "preset-batch4-lr3e-2": {**PRESET, "batch_size": 4, "lr": 3e-2},
    "preset-batch4-every2": {**PRESET, "batch_size": 4, "memory_layers": list(range(8, 30, 2))},
    # a training-only block summed into every (or every other) path, dropped at export
    "preset-batch4-shared1": {**PRESET, "batch_size": 4, "shared_prob": 1.0},
    "preset-batch4-shared05": {**PRESET, "batch_size": 4, "shared_prob": 0.5},
    # memory from earlier layers: the entity's own position enriched sooner, for the answer to be read
    # from further away (the question forms, whose answer stem does not follow the name)
    "preset-batch4-from4": {**PRESET, "batch_size": 4, "memory_layers": list(range(4, 30, 4))},
    "preset-batch4-from0": {**PRESET, "batch_size": 4, "memory_layers": list(range(0, 30, 4))},
})


def subset(corpus_dir: Path, n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`n` trained facts' valid probes (seeded sample) and all of their documents."""
    probes = [json.loads(line) for line in (corpus_dir / "probes.jsonl").read_text().splitlines()]
    docs = {d["id"]: d for d in map(json.loads, (corpus_dir / "docs.jsonl").read_text().splitlines())}
    valid = [p for p in probes if p["split"] == "valid"]
    random.Random(seed).shuffle(valid)
    valid = valid[:n]
    return valid, [docs[i] for p in valid for i in p["doc_ids"]]


def fit_prompt(p: dict, docs: dict[str, dict]) -> str | None:
    """The first sentence of the fact's documents that states the answer, cut before it."""
    for did in p["doc_ids"]:
        for sent in re.split(r"(?<=[.])\s+", docs[did]["text"]):
            k = sent.find(" " + p["answer"].strip())
            if k > 0:
                return sent[:k]
    return None


def run_variant(name: str, overrides: dict, valid: list[dict], docs: list[dict], branching: list[int],
                work: Path) -> dict:
    import torch

    from lm import SamplingParams, generate
    from training.config import TrainConfig
    from training.scoring import text_match
    from training.trainer import Trainer

    cdir = work / name / "corpus"
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (cdir / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in valid))
    values: dict[str, Any] = dict(corpus=str(cdir), out=str(work / name / "job"), anchor="smollm2", routing="tree",
                  branching=branching, ranks=[64, 32], epochs=10, warmup_steps=5, loss="all",
                  preserve_weight=0.0, generic_prob=0.0, progress=False,
                  # TrainConfig's defaults when these rounds were measured (they are the docs preset's now)
                  skip_name_targets=False, preserve_per_doc=1, preserve_batch=16)
    values.update(overrides)
    t0 = time.perf_counter()
    tr = Trainer(TrainConfig(**values))
    tr.train()
    train_s = time.perf_counter() - t0
    by_id = {d["id"]: i for i, d in enumerate(tr.docs)}
    doc_of = {d["id"]: d for d in docs}
    tok, model = tr.tokenizer, tr.model
    sp = SamplingParams(max_new_tokens=6)
    right = anchor = fit = n_fit = 0
    by_form: dict[str, list[int]] = {}  # template -> [right, total]
    for p in valid:
        memory = tr.paths_memory([tr.paths[by_id[p["doc_ids"][0]]]], False)
        ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ok = text_match(generate(model, tok, ids, sp, memory=memory).text, p["answer"])
            right += ok
            form = by_form.setdefault(p.get("template", "?"), [0, 0])
            form[0], form[1] = form[0] + ok, form[1] + 1
            anchor += text_match(generate(model, tok, ids, sp).text, p["answer"])
            fp = fit_prompt(p, doc_of)
            if fp:
                n_fit += 1
                fit += text_match(generate(model, tok, tok(fp, add_special_tokens=False)["input_ids"], sp,
                                           memory=memory).text, p["answer"])
    recorded = ("memory_layers", "batch_size", "lr", "level_lr", "ranks", "epochs", "name_anaphors",
                "preserve_weight", "shared_prob", "skip_name_targets")
    return {"variant": name, **{k: overrides.get(k, values.get(k)) for k in recorded},
            "valid_exact_match": right / len(valid), "anchor": anchor / len(valid),
            "fit": fit / max(n_fit, 1),
            # valid:0 = the question forms (the answer stem after "Answer:", away from the name), valid:1 the
            # sentence forms (the stem right after the name), valid:2 the field forms ("Place: X\nNation:"; only
            # in corpora built since the fifth settings round, docs/training.md)
            **{f"valid_{k.removeprefix('valid:')}": round(r / n, 4) for k, (r, n) in sorted(by_form.items())},
            "train_seconds": round(train_s, 1), "steps": tr.global_step,
            # the output scale the trainer chose on these same valid probes (training/scale.py) and the valid
            # figure there: optimistic as an absolute figure (chosen and read on one set), fair between variants
            **_scaled(json.loads((work / name / "job" / "job.json").read_text()).get("memory_scale", {}))}


def _scaled(info: dict) -> dict:
    acc = {float(k): v for k, v in (info.get("accuracy") or {}).items()}  # JSON keys are strings
    return {"scale": info.get("scale"), "valid_scaled": acc.get(info.get("scale"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="documents corpus (default: $HIERMEM_HOME/work/docs/corpus, "
                                                   "built with the docs preset's sample if missing)")
    ap.add_argument("--facts", type=int, default=120)
    ap.add_argument("--branching", default="8,4", help="tree for the subset (about 4 facts per leaf, as the preset)")
    ap.add_argument("--variants", default="old,preset,preset-batch4", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--name", default="longtail-settings")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from base.paths import home

    torch.set_num_threads(2)
    corpus_dir = Path(args.corpus) if args.corpus else home() / "work" / "docs" / "corpus"
    if not (corpus_dir / "probes.jsonl").exists():
        from training.corpus_docs import build_documents_corpus
        from training.pipeline import PRESETS

        spec = dict(PRESETS["docs"]["corpus"])
        spec.pop("style")
        build_documents_corpus(**spec).save(corpus_dir)
    valid, docs = subset(corpus_dir, args.facts)
    branching = [int(x) for x in args.branching.split(",")]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="longtail-settings-"))
    try:
        for name in args.variants.split(","):
            rows.append(run_variant(name, VARIANTS[name], valid, docs, branching, work))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tables = (f"{len(valid)} trained facts of `{corpus_dir}` ({len(docs)} documents), tree {branching}, "
              "10 epochs unless said, no generic control, no preservation; exact match on the `valid` "
              "wordings through the fact's path.\n\n" + markdown_table(rows))
    write_results(args.name, {"facts": len(valid), "documents": len(docs), "branching": branching, "rows": rows},
                  [], tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
