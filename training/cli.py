"""`hiermem corpus facts`, `hiermem train`, `hiermem train merge`, `hiermem eval longtail`, `hiermem build`.

Heavy modules (torch, the anchor, memory_store) are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from training.pipeline import DEFAULT_PRESET, PRESETS, check_preset

log = logging.getLogger(__name__)


def _preset(name: str) -> str:
    try:
        return check_preset(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

def cmd_corpus_facts(args: argparse.Namespace) -> int:
    if getattr(args, "style", "facts") == "documents":
        return _corpus_documents(args)
    from training.corpus import DEFAULT_SIZES, build_facts_corpus, corpus_summary

    if args.heldout_fraction is None:
        args.heldout_fraction = 0.15
    sizes = _sizes(DEFAULT_SIZES, args.size)
    corpus = build_facts_corpus(sizes, heldout_fraction=args.heldout_fraction, n_buckets=args.buckets,
                                seed=args.seed, preserve_ratio=args.preserve_ratio,
                                heldout_extra=args.heldout_extra)
    corpus.save(Path(args.out))
    print(json.dumps(corpus_summary(corpus), indent=2))
    return 0


def _sizes(defaults: dict[str, int], items: list[str] | None) -> dict[str, int]:
    """--size RELATION=N overrides on top of a corpus's default sizes."""
    sizes = dict(defaults)
    for item in items or []:
        name, _, n = item.partition("=")
        if name not in sizes:
            raise SystemExit(f"unknown relation {name!r}; known: {', '.join(sizes)}")
        sizes[name] = int(n)
    return sizes


def _corpus_documents(args: argparse.Namespace) -> int:
    from training.corpus_docs import (
        DEMO_HELDOUT_FRACTION,
        DEMO_SIZES,
        build_documents_corpus,
        documents_summary,
    )

    sizes = _sizes(DEMO_SIZES, args.size)
    lo, _, hi = args.docs_per_entity.partition(",")
    corpus = build_documents_corpus(
        sizes, heldout_fraction=DEMO_HELDOUT_FRACTION if args.heldout_fraction is None else args.heldout_fraction,
        n_buckets=args.buckets, seed=args.seed, heldout_extra=args.heldout_extra,
        docs_per_entity=(int(lo), int(hi or lo)), valid=not args.no_valid)
    corpus.save(Path(args.out))
    print(json.dumps(documents_summary(corpus), indent=2))
    return 0


def cmd_route_agreement(args: argparse.Namespace) -> int:
    from training.corpus import Corpus
    from training.routing import agreement_study

    corpus = Corpus.load(Path(args.corpus))
    branching = [int(x) for x in args.branching.replace("x", ",").split(",")]
    result = agreement_study(corpus.docs, corpus.probes, branching, embedder_name=args.embedder)
    print(json.dumps({"branching": branching, **result}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.trainer import run_train_command

    return run_train_command(TrainConfig.from_args(args))


def cmd_train_merge(args: argparse.Namespace) -> int:
    from training.export import merge_subtree_jobs

    merge_subtree_jobs([Path(p) for p in args.jobs], Path(args.out), n_shards=args.shards)
    print(args.out)
    return 0


def cmd_eval_longtail(args: argparse.Namespace) -> int:
    from training.evaluate import run_eval_command

    return run_eval_command(args)


def cmd_build(args: argparse.Namespace) -> int:
    from training.pipeline import run_build_command

    return run_build_command(args)


def register(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser("corpus", help="build a training corpus")
    csub = corpus.add_subparsers(dest="corpus_command", metavar="KIND", required=True)
    facts = csub.add_parser("facts", help="the built-in long-tail facts corpus (cities, capitals, elements)")
    facts.add_argument("--out", required=True, help="output directory (docs.jsonl + probes.jsonl)")
    facts.add_argument("--size", action="append", metavar="RELATION=N",
                       help="facts per relation (0 = all), e.g. city_country=1800; repeatable")
    facts.add_argument("--style", choices=["facts", "documents"], default="facts",
                       help="facts: one probe-worded document per fact (with route_text); documents: 2-3 "
                            "paragraphs per entity in varied wordings, probes and valid prompts worded "
                            "differently (training/corpus_docs.py; sizes default to DEMO_SIZES)")
    facts.add_argument("--heldout-fraction", type=float, default=None,
                       help="default 0.15 (facts) / 0.2 (documents)")
    facts.add_argument("--buckets", type=int, default=5)
    facts.add_argument("--preserve-ratio", type=float, default=0.5,
                       help="preserve prompts per fact (untrained entities of the same relations; "
                            "facts style only)")
    facts.add_argument("--heldout-extra", type=float, default=0.0,
                       help="extra held-out facts per fact, about entities used nowhere else")
    facts.add_argument("--seed", type=int, default=0)
    facts.add_argument("--docs-per-entity", default="2,3", metavar="LO,HI",
                       help="documents style: documents per trained entity, drawn in LO..HI")
    facts.add_argument("--no-valid", action="store_true",
                       help="documents style: no valid / valid_heldout probes")
    facts.set_defaults(func=cmd_corpus_facts)
    agree = csub.add_parser("route-agreement",
                            help="how often a fact's prompt routes to the leaf of the document stating it")
    agree.add_argument("--corpus", required=True)
    agree.add_argument("--branching", default="8,8")
    agree.add_argument("--embedder", default="all-MiniLM-L6-v2")
    agree.set_defaults(func=cmd_route_agreement)

    from training.config import add_train_flags

    train = sub.add_parser("train", help="train memories (post-hoc on a frozen anchor by default)")
    add_train_flags(train)
    train.set_defaults(func=cmd_train)
    tsub = train.add_subparsers(dest="train_command", metavar="SUBCOMMAND")
    merge = tsub.add_parser("merge", help="merge per-subtree jobs (hiermem train --subtree I) into one bank")
    merge.add_argument("jobs", nargs="+", help="the --out directories of the subtree jobs")
    merge.add_argument("--out", required=True, help="bank directory to write")
    merge.add_argument("--shards", type=int, default=1)
    merge.set_defaults(func=cmd_train_merge)

    ev = sub.add_parser("eval", help="evaluate a bank")
    esub = ev.add_subparsers(dest="eval_command", metavar="KIND", required=True)
    lt = esub.add_parser("longtail", help="exact match per bucket: anchor / generic / hierarchical, deletion")
    lt.add_argument("--bank", required=True)
    lt.add_argument("--corpus", required=True)
    lt.add_argument("--anchor", default=None, help="smollm2 | tiny | DIR (default: the one the bank names)")
    lt.add_argument("--out", default=None, help="directory for longtail.json/.md/.png (default: BANK/eval)")
    lt.add_argument("--delete", type=int, default=None, help="level-1 subtree to delete (default: busiest)")
    lt.add_argument("--batch-size", type=int, default=64)
    lt.add_argument("--limit", type=int, default=0, help="evaluate at most this many probes (0 = all)")
    lt.add_argument("--rag", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                    help="also score retrieval: the anchor with the top-k documents before the prompt, e.g. 1,3")
    lt.add_argument("--no-general", action="store_true", help="skip the general-prompts check")
    lt.add_argument("--chat", type=int, default=0, metavar="N",
                    help="also ask in chat (training/chat_eval.py): every rarest-bucket trained fact and N cases "
                         "per other family, memory off / auto / retrieval side by side (0 = off)")
    lt.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                    help="run the anchor as the model server does in this compute dtype (lm/fast.py); "
                         "float32 = the plain model")
    lt.set_defaults(func=cmd_eval_longtail)

    build = sub.add_parser("build", help="corpus -> tree -> train -> export -> eval in one resumable command")
    build.add_argument("--preset", default=DEFAULT_PRESET, type=_preset, metavar="{" + ",".join(PRESETS) + "}",
                       help=f"what to build (default {DEFAULT_PRESET}: the demo bank that scripts/run.sh serves); "
                            "with --docs only the training settings are taken from it")
    build.add_argument("--docs", nargs="+", default=None, metavar="PATH",
                       help="build from your own files instead of a preset's corpus: .txt, .md/.markdown and "
                            ".jsonl ({\"text\", \"id\"?} per line) files, and folders of them (read recursively)")
    build.add_argument("--questions", default=None, metavar="FILE",
                       help="with --docs: a JSONL of {\"question\", \"answer\"} to evaluate the bank on "
                            "(without it the evaluation is skipped)")
    build.add_argument("--out", default=None,
                       help="bank directory (default: $HIERMEM_HOME/banks/<preset>, or <name of the first --docs path>)")
    build.add_argument("--work", default=None,
                       help="work directory (default: $HIERMEM_HOME/work/<preset>, or <name of the first --docs path>)")
    build.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    build.add_argument("--no-eval", action="store_true")
    build.add_argument("--no-generic", action="store_true",
                       help="train no generic memory (the evaluation's same-epochs control, trained beside the "
                            "tree's blocks in the same forward): a shorter build, and a bank without one")
    build.set_defaults(func=cmd_build)
