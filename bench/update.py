"""A bank kept current without a rebuild (issue 29, docs/training.md "Your own documents").

    python -m bench.update [--scale 0.25] [--add 20] [--remove 20]

The `docs` preset's corpus (its sizes times --scale) is written out as files, one .txt per document, and
built as a user builds a folder: `hiermem build --docs FILES` with no other flag. Then, on a versioned root:

1. **add**: the documents of --add entities the bank never saw, `hiermem bank update --add`; compared with a
   full build of every file (the same command on base + added files): update time over full-build time,
   recall of the added facts, every block of a leaf that got no new passage byte for byte, held-out facts
   the anchor knew that the update broke;
2. **remove**: the documents of --remove trained entities, `hiermem bank update --remove`: how many of their
   fact prompts still get memory (the gate must close), whether each is answered as the anchor alone answers
   it, whether any other trained fact changed, and whether a removed passage's text is in any file.

Facts are the corpus's completion probes (`train` for trained entities, `heldout` for held-out ones),
answered as the model server routes them (training/evaluate.py). Results: bench/results/update.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, markdown_table, target, targets_table, write_results  # noqa: E402


def write_files(docs: list[dict], folder: Path) -> dict[str, str]:
    """One .txt per document; returns doc id -> the file's source name as `read_passages` names it."""
    folder.mkdir(parents=True, exist_ok=True)  # a second run with the same --work resumes its builds
    out = {}
    for d in docs:
        name = d["id"].replace(":", "-").replace("/", "-") + ".txt"
        (folder / name).write_text(d["text"] + "\n")
        out[d["id"]] = f"{folder.name}/{name}"
    return out


def evaluate(bank: Path, corpus: Path, out: Path) -> dict[str, dict]:
    """prompt -> {"anchor", "hierarchical", "path"} for every probe of the corpus."""
    from memory_store.bank import resolve_bank_dir
    from training.evaluate import evaluate_longtail

    # the version a root's `current` names: its router lies there
    evaluate_longtail(resolve_bank_dir(bank), corpus, out_dir=out, general=False, progress=False)
    rows = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    return {p["prompt"]: p for p in rows}


def share(xs: list[bool]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.25, help="the docs preset's corpus sizes times this")
    ap.add_argument("--add", type=int, default=20)
    ap.add_argument("--remove", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)

    from memory_store import Bank, NodeRef
    from memory_store.ops import init_version_root
    from training.corpus import Corpus
    from training.corpus_docs import build_documents_corpus
    from training.pipeline import PRESETS, run_build
    from training.update import update_bank

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-update-"))
    spec = dict(PRESETS["docs"]["corpus"])
    spec.pop("style")
    spec["sizes"] = {k: max(2, round(v * args.scale)) for k, v in spec["sizes"].items()}
    corpus = build_documents_corpus(**spec, valid=False)
    trained = sorted({p.entity for p in corpus.probes if p.split == "train"})
    rng = random.Random(args.seed)
    rng.shuffle(trained)
    added_e, removed_e = set(trained[:args.add]), set(trained[args.add:args.add + args.remove])
    entity_of = {i: p.entity for p in corpus.probes if p.split == "train" for i in p.doc_ids}
    base_docs = [d for d in corpus.docs if entity_of.get(d["id"]) not in added_e]
    add_docs = [d for d in corpus.docs if entity_of.get(d["id"]) in added_e]
    source = write_files(base_docs, work / "files" / "base") | write_files(add_docs, work / "files" / "added")
    Corpus(docs=corpus.docs, probes=corpus.probes).save(work / "corpus")  # the probes to ask every bank

    # a build's first run, from its build.json (a second run of this script resumes the builds)
    base_s = run_build(docs=[work / "files" / "base"], bank_dir=work / "base-bank", work=work / "base-work",
                       evaluate=False)["status"]["first_run_seconds"]
    full_s = run_build(docs=[work / "files" / "base", work / "files" / "added"], bank_dir=work / "full-bank",
                       work=work / "full-work", evaluate=False)["status"]["first_run_seconds"]
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)
    init_version_root(work / "base-bank", root)
    before = evaluate(root, work / "corpus", work / "eval-base")
    blocks_before = _blocks(root, Bank, NodeRef)

    full = evaluate(work / "full-bank", work / "corpus", work / "eval-full")

    def facts(entities: set[str], split: str = "train") -> list:
        return [p for p in corpus.probes if p.entity in entities and p.split == split]

    added_probes = facts(added_e)
    base_probes = [p for p in corpus.probes if p.split == "train" and p.entity not in added_e]
    known_heldout = [p for p in corpus.probes if p.split == "heldout" and before[p.prompt]["anchor"]]

    def add_phase(mode_root: Path, only_new: bool) -> tuple[dict, dict]:
        """`hiermem bank update --add` on a copy of the base version; (figures, answers after it)."""
        shutil.rmtree(mode_root, ignore_errors=True)
        init_version_root(work / "base-bank", mode_root)
        t0 = time.perf_counter()
        out = update_bank(mode_root, add=[str(work / "files" / "added")], progress=False, only_new=only_new)
        seconds = time.perf_counter() - t0
        after = evaluate(mode_root, work / "corpus", work / f"eval-add-{'new' if only_new else 'all'}")
        blocks_after = _blocks(mode_root, Bank, NodeRef)
        changed = {p[-1] for p in out["changed_leaves"]}
        depth = max(r.level for r in blocks_before)
        untouched = [r for r in blocks_before if not (r.level == depth and r.index in changed)]
        same = sum(blocks_before[r] == blocks_after[r] for r in untouched)
        return {**{k: v for k, v in out.items() if k not in ("added", "removed", "bank_id", "bank")},
                "seconds_total": round(seconds, 1), "time_over_full_build": round(seconds / full_s, 3),
                "recall_update": share([after[p.prompt]["hierarchical"] for p in added_probes]),
                "recall_full_build": share([full[p.prompt]["hierarchical"] for p in added_probes]),
                "recall_anchor": share([before[p.prompt]["anchor"] for p in added_probes]),
                "untouched_blocks_identical": f"{same}/{len(untouched)}", "untouched_blocks_differing": len(untouched) - same,
                "base_facts_changed": sum(after[p.prompt]["hierarchical"] != before[p.prompt]["hierarchical"]
                                          for p in base_probes),
                "base_facts": len(base_probes),
                "heldout_known_by_anchor": len(known_heldout),
                "heldout_newly_broken": sum(not after[p.prompt]["hierarchical"] for p in known_heldout)}, after

    add_all, after_add = add_phase(root, only_new=False)
    add_new, _ = add_phase(work / "root-only-new", only_new=True)

    t0 = time.perf_counter()
    rem = update_bank(root, remove=[source[d["id"]] for d in base_docs if entity_of.get(d["id"]) in removed_e],
                      progress=False)
    remove_s = time.perf_counter() - t0
    after_rem = evaluate(root, work / "corpus", work / "eval-remove")
    removed_probes = facts(removed_e)
    others = [p for p in corpus.probes if p.split == "train" and p.entity not in removed_e]
    with Bank.open(root) as bank:
        texts = [d["text"] for d in base_docs if entity_of.get(d["id"]) in removed_e]
        leaked = [str(f) for f in bank.dir.rglob("*") if f.is_file() and any(t.encode() in f.read_bytes() for t in texts)]

    figures = {
        "corpus": {"scale": args.scale, "docs": len(corpus.docs), "trained_entities": len(trained),
                   "added_entities": len(added_e), "removed_entities": len(removed_e)},
        "seconds": {"build_base": round(base_s, 1), "build_full": round(full_s, 1),
                    "update_add": add_all["seconds_total"], "update_add_only_new": add_new["seconds_total"],
                    "update_remove": round(remove_s, 1)},
        "add": add_all, "add_only_new": add_new,
        "remove": {**{k: v for k, v in rem.items() if k not in ("added", "removed", "bank_id", "bank")},
                   "removed_documents": len(rem["removed"]),
                   "removed_facts_with_memory": sum(bool(after_rem[p.prompt]["path"]) for p in removed_probes),
                   "removed_facts_as_anchor": share([after_rem[p.prompt]["hierarchical"] == after_rem[p.prompt]["anchor"]
                                                     for p in removed_probes]),
                   "removed_facts": len(removed_probes),
                   "heldout_facts_with_memory": share([bool(after_rem[p.prompt]["path"]) for p in corpus.probes
                                                       if p.split == "heldout"]),
                   "other_facts_changed": sum(after_rem[p.prompt]["hierarchical"] != after_add[p.prompt]["hierarchical"]
                                              for p in others),
                   "files_with_removed_text": leaked},
    }
    r = figures["remove"]
    targets = []
    for name, a in (("add", add_all), ("add --only-new", add_new)):
        targets += [
            target(f"{name}: update time / full build time", a["time_over_full_build"], "<=", 0.10),
            target(f"{name}: added facts' recall, full build minus update",
                   round(a["recall_full_build"] - a["recall_update"], 4), "<=", 0.05),
            target(f"{name}: untouched leaves' blocks not identical", a["untouched_blocks_differing"], "<=", 0),
            target(f"{name}: held-out facts the anchor knew, broken", a["heldout_newly_broken"], "<=", 0)]
    targets += [
        target("remove: removed facts answered otherwise than by the anchor",
               round(1 - r["removed_facts_as_anchor"], 4), "<=", 0),
        target("remove: removed facts still given memory", r["removed_facts_with_memory"], "<=", 0),
        target("remove: other trained facts changed", r["other_facts_changed"], "<=", 0),
        target("remove: files of the new version holding removed text", len(leaked), "<=", 0),
    ]
    md = (f"Corpus: the docs preset's at scale {args.scale} ({len(corpus.docs)} documents, {len(trained)} trained "
          f"entities), written as one .txt per document and built with `hiermem build --docs` alone.\n\n"
          + markdown_table([{"step": k, "seconds": v} for k, v in figures["seconds"].items()]) + "\n"
          + markdown_table([{"figure": k, "add": add_all.get(k, ""), "add --only-new": add_new.get(k, ""),
                             "remove": r.get(k, "")} for k in dict.fromkeys([*add_all, *r])
                            if not isinstance(add_all.get(k, r.get(k)), list | dict)])
          + "\n" + targets_table(targets))
    out = write_results("update", figures, targets, md, results_dir=Path(args.out))
    _plot(figures, out.with_suffix(".png"))
    print(json.dumps({t["name"]: (t["value"], t["met"]) for t in targets}, indent=2))
    return 0


def _blocks(root: Path, Bank, NodeRef) -> dict:
    with Bank.open(root) as bank:
        return {NodeRef(lv, i): bytes(bank.read_block_bytes(NodeRef(lv, i)))
                for lv in range(1, bank.spec.depth + 1) for i in range(bank.spec.nodes_at(lv))}


def _plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    s = figures["seconds"]
    ax1.bar(["full build", "add", "add\n--only-new", "remove"],
            [s["build_full"], s["update_add"], s["update_add_only_new"], s["update_remove"]])
    ax1.set_ylabel("seconds")
    a, n = figures["add"], figures["add_only_new"]
    ax2.bar(["anchor", "update", "update\n--only-new", "full build"],
            [a["recall_anchor"], a["recall_update"], n["recall_update"], a["recall_full_build"]])
    ax2.set_ylabel("added facts recalled")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
