"""`hiermem bank synth | inspect | reshard | convert | verify | delete | init-root | publish | update | versions` and
`hiermem route`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Given an anchor name or directory: (its AnchorIdentity, n_layers, d_model). memory_store does not import lm
# (tests/test_layering.py), so the `hiermem` entry point, which may, hands this to register().
AnchorResolver = Callable[[str], tuple[Any, int, int]]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def register(subparsers, resolve_anchor: AnchorResolver | None = None,
             update_bank: Callable[[Any], int] | None = None) -> None:
    bank = subparsers.add_parser("bank", help="build, inspect, verify, reshard and edit memory banks")
    sub = bank.add_subparsers(dest="bank_command", metavar="ACTION", required=True)

    p = sub.add_parser("synth", help="write a random-weight bank of any layout (streaming, bounded RAM)")
    p.add_argument("--out", required=True, help="bank directory to create")
    p.add_argument("--preset", choices=["paper-smollm2", "tiny"], help="start from a preset layout")
    p.add_argument("--anchor", help="the anchor the bank is for: smollm2, tiny or a Hugging Face Llama directory; "
                   "the bank takes its identity (the model server refuses a bank made for another anchor), depth "
                   "and width. 'synthetic' = an identity no anchor has (benchmarks of the bank alone). Default: "
                   "the preset's (paper-smollm2: smollm2), else synthetic")
    p.add_argument("--branching", type=_ints, help="children per level, e.g. 16,16,16")
    p.add_argument("--ranks", type=_ints, help="r per level, e.g. 256,64,16")
    p.add_argument("--layers", default=None, help="'all' or comma-separated anchor layer indices")
    p.add_argument("--n-layers", type=int, help="anchor depth")
    p.add_argument("--d-model", type=int, help="anchor hidden size")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8"])
    p.add_argument("--embedder-dim", type=int, default=384)
    p.add_argument("--shard-level", type=int, default=1)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-generic", action="store_true", help="do not export a generic memory")
    p.add_argument("--force", action="store_true", help="replace an existing bank at --out")
    p.set_defaults(func=_synth, resolve_anchor=resolve_anchor)

    p = sub.add_parser("inspect", help="print a bank's spec, sizes and shards")
    p.add_argument("--bank", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check every block against its crc32c (exit 1 on any problem)")
    p.add_argument("--bank", required=True)
    p.set_defaults(func=_verify)

    out_help = ("write the new bank here; without it --bank must be a versioned root (init-root), which "
                "gets a new version that `current` points at (a plain bank directory is never rewritten)")
    p = sub.add_parser("reshard", help="write a copy with another shard count (same bank_id, new layout)")
    p.add_argument("--bank", required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--out", help=out_help)
    p.set_defaults(func=_reshard)

    p = sub.add_parser("convert", help="write a copy with its blocks in another dtype (int8: each row quantized with "
                                       "its own scale, about half the bytes of 16-bit blocks): a new bank_id")
    p.add_argument("--bank", required=True)
    p.add_argument("--dtype", required=True, choices=["float32", "float16", "bfloat16", "int8"])
    p.add_argument("--out", help=out_help)
    p.set_defaults(func=_convert)

    p = sub.add_parser("delete", help="write a copy without (or with zeroed) subtrees: a new bank_id")
    p.add_argument("--bank", required=True)
    p.add_argument("--node", action="append", required=True, help="subtree root LEVEL:INDEX (repeatable)")
    p.add_argument("--zero", action="store_true", help="zero the blocks instead of removing them")
    p.add_argument("--out", help=out_help)
    p.set_defaults(func=_delete)

    p = sub.add_parser("init-root", help="make a versioned bank root whose first version is --bank")
    p.add_argument("--bank", required=True, help="an existing bank directory (hard-linked, not moved)")
    p.add_argument("--root", required=True, help="the root to create (versions/, current)")
    p.set_defaults(func=_init_root)

    p = sub.add_parser("publish", help="add a bank (retrained, merged) as the next version of a versioned root")
    p.add_argument("--bank", required=True, help="the new bank directory (hard-linked, not moved)")
    p.add_argument("--root", required=True, help="the versioned root; its current then points at the copy")
    p.set_defaults(func=_publish)

    if update_bank is not None:  # training's command (training/update.py), handed over by the entry point
        p = sub.add_parser("update", help="add and remove documents without a rebuild: retrain only the leaves "
                           "whose documents change, publish the next version")
        p.add_argument("--bank", required=True, help="the versioned root (its current version is updated)")
        p.add_argument("--add", nargs="+", default=[], metavar="PATH",
                       help="files and folders of .txt, .md, .jsonl (a file added again replaces its passages)")
        p.add_argument("--remove", nargs="+", default=[], metavar="ID",
                       help="document ids or source files (as the bank's documents.jsonl names them)")
        p.add_argument("--out", help="write the updated bank here instead of a new version of --bank")
        p.add_argument("--work", help="scratch directory (default: beside --bank; removed when done)")
        p.add_argument("--epochs", type=int, help="override the bank's training epochs")
        p.add_argument("--only-new", action="store_true",
                       help="a leaf that only gains passages starts from its block and trains on the new ones alone "
                            "(faster; its earlier facts may drift); a leaf that loses one is always trained afresh")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=update_bank)

    p = sub.add_parser("versions", help="list the versions of a versioned root; --use NAME re-points current")
    p.add_argument("--bank", required=True, help="the versioned root")
    p.add_argument("--use", help="point current at this version (roll forward or back)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_versions)

    r = subparsers.add_parser("route", help="embed prompts and descend a bank's tree (prints paths and timing)")
    r.add_argument("text", nargs="*", help="prompt(s)")
    r.add_argument("--bank", required=True)
    r.add_argument("--file", help="a file with one prompt per line")
    r.add_argument("--embedder", help="embedder name (default: the bank's)")
    r.add_argument("--json", action="store_true", help="one JSON object per prompt, then a summary")
    r.add_argument("--quiet", action="store_true", help="print only the timing summary")
    r.set_defaults(func=_route)


def _synth(args) -> int:
    from memory_store.spec import BankSpec
    from memory_store.synth import PRESETS, SYNTH_ANCHOR, synth_bank

    fields = dict(PRESETS[args.preset]) if args.preset else {}
    anchor_name = fields.pop("anchor", None) if args.anchor is None else args.anchor
    fields.pop("anchor", None)
    identity = SYNTH_ANCHOR
    if anchor_name not in (None, "synthetic"):
        if args.resolve_anchor is None:
            raise SystemExit("--anchor needs the `hiermem` command (it loads the anchor); or pass --anchor synthetic")
        identity, n_layers, d_model = args.resolve_anchor(anchor_name)
        for flag, given, actual in (("--n-layers", args.n_layers, n_layers), ("--d-model", args.d_model, d_model)):
            if given is not None and given != actual:
                raise SystemExit(f"{flag} {given} does not match anchor {anchor_name} ({actual})")
        if fields.get("memory_layers") == list(range(fields.get("n_layers", -1))):
            fields["memory_layers"] = "all"  # a preset on all of its layers: all of this anchor's
        fields["n_layers"], fields["d_model"] = n_layers, d_model
    for key, val in [("branching", args.branching), ("ranks", args.ranks), ("n_layers", args.n_layers),
                     ("d_model", args.d_model), ("dtype", args.dtype)]:
        if val is not None:
            fields[key] = val
    if args.layers is not None:
        fields["memory_layers"] = ("all" if args.layers == "all" else _ints(args.layers))
    if fields.get("memory_layers", "all") == "all":
        if "n_layers" not in fields:
            raise SystemExit("--n-layers is needed with --layers all")
        fields["memory_layers"] = list(range(fields["n_layers"]))
    missing = [k for k in ("branching", "ranks", "n_layers", "d_model") if k not in fields]
    if missing:
        raise SystemExit(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} (or use --preset)")
    fields.setdefault("dtype", "float16")
    spec = BankSpec(**fields, embedder_dim=args.embedder_dim, shard_level=args.shard_level)
    print(f"bank: {spec.bank_params / 1e9:.3f}B params, {spec.bank_bytes / 1e9:.2f} GB; "
          f"path: {spec.fetched_params / 1e6:.2f}M params; anchor {anchor_name or 'synthetic'} "
          f"({identity.arch} {identity.hash[:16]})")
    bank_id = synth_bank(args.out, spec, args.shards, seed=args.seed, generic=not args.no_generic,
                         anchor=identity, overwrite=args.force, progress=True)
    print(f"bank_id {bank_id}")
    return 0


def _inspect(args) -> int:
    from memory_store.ops import inspect_bank

    info = inspect_bank(args.bank)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = info["spec"]
    print(f"bank {info['dir']}\n  bank_id   {info['bank_id']}\n  anchor    {info['anchor']['arch']} "
          f"{info['anchor']['hash'][:16]}\n  dtype     {s['dtype']}  d_model {s['d_model']}  "
          f"memory layers {len(s['memory_layers'])}/{s['n_layers']}\n  embedder  {s['embedder_name']} "
          f"({s['embedder_dim']})\n  size      {info['bank_params'] / 1e9:.3f}B params, "
          f"{info['bank_bytes'] / 1e9:.2f} GB; path {info['fetched_params'] / 1e6:.2f}M params "
          f"({info['fetched_bytes'] / 1e6:.1f} MB)\n  generic   {'yes' if info['generic'] else 'no'}"
          f"{' (trained before the deletions: it may hold what they held)' if info['generic_predates_deletions'] else ''}")
    if info["deleted"]:
        print(f"  deleted   {', '.join(info['deleted'])} (and their subtrees)")
    for lv in info["levels"]:
        print(f"  level {lv['level']}: {lv['nodes']} nodes ({lv['present']} present), r={lv['rank']}, "
              f"block {lv['block_bytes'] / 1e6:.2f} MB, level {lv['level_bytes'] / 1e9:.3f} GB")
    for sh in info["shards"]:
        owned = sh["owned_subtrees"]
        print(f"  shard {sh['id']}: {len(owned)} subtrees ({owned[0]} .. {owned[-1]})")
    return 0


def _verify(args) -> int:
    from memory_store.ops import verify_bank

    report = verify_bank(args.bank, progress=True)
    for problem in report.problems:
        print(f"CORRUPT {problem}")
    print(f"{'OK' if report.ok else 'FAILED'}: {report.blocks_checked} blocks, "
          f"{report.bytes_checked / 1e9:.3f} GB checked, {report.absent} absent, "
          f"{len(report.problems)} problems (bank_id {report.bank_id[:12]})")
    return 0 if report.ok else 1


def _where(args) -> str:
    """Where the result went, and what to do next (nothing that runs changed)."""
    from memory_store.bank import is_version_root, resolve_bank_dir

    if args.out:
        return (f"written to {args.out}; running replicas still serve {args.bank}: roll them one by one "
                "onto the new directory (docs/operating.md, 'Rolling a new bank version')")
    if is_version_root(args.bank):
        return (f"new version {resolve_bank_dir(args.bank).name}, {args.bank}/current points at it; running "
                "replicas keep their version until restarted: roll them one by one (docs/operating.md)")
    return ""


def _run_op(fn) -> int:
    from memory_store.errors import BankError

    try:
        fn()
    except BankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _reshard(args) -> int:
    from memory_store.ops import reshard

    def op() -> None:
        bank_id = reshard(args.bank, args.shards, out=args.out, progress=True)
        print(f"bank_id {bank_id}; {_where(args)}")

    return _run_op(op)


def _convert(args) -> int:
    from memory_store.ops import rewrite_bank

    def op() -> None:
        bank_id = rewrite_bank(args.bank, args.out, dtype=args.dtype, progress=True)
        print(f"blocks in {args.dtype}; new bank_id {bank_id}; {_where(args)}")

    return _run_op(op)


def _delete(args) -> int:
    from memory_store.ops import delete_subtrees
    from memory_store.spec import NodeRef

    refs = [NodeRef.parse(n) for n in args.node]

    def op() -> None:
        bank_id = delete_subtrees(args.bank, refs, zero=args.zero, out=args.out, progress=True)
        print(f"{'zeroed' if args.zero else 'deleted'} {', '.join(map(str, refs))}; new bank_id {bank_id}; "
              f"{_where(args)}")
        if not args.zero:
            print("note: the generic memory is carried over unchanged; it was trained before this deletion "
                  "and may hold what the deleted subtrees held (retrain it to forget them)")

    return _run_op(op)


def _init_root(args) -> int:
    from memory_store.ops import init_version_root

    def op() -> None:
        name = init_version_root(args.bank, args.root)
        print(f"versioned root {args.root}: version {name} (current)")

    return _run_op(op)


def _publish(args) -> int:
    from memory_store.ops import add_version

    def op() -> None:
        name = add_version(args.bank, args.root)
        print(f"{args.root}: version {name} is current; running replicas keep theirs until restarted: roll "
              "them one by one (docs/operating.md)")

    return _run_op(op)


def _versions(args) -> int:
    from memory_store.ops import list_versions, use_version

    def op() -> None:
        if args.use:
            use_version(args.bank, args.use)
        versions = list_versions(args.bank)
        if args.json:
            print(json.dumps(versions, indent=2))
            return
        for v in versions:
            print(f"{'*' if v['current'] else ' '} {v['name']}  bank_id {v['bank_id'][:12]}  {v['shards']} shards"
                  f"{'  deleted ' + ','.join(v['deleted']) if v['deleted'] else ''}")

    return _run_op(op)


def _route(args) -> int:
    import time

    import numpy as np

    from memory_store.bank import Bank
    from memory_store.embed import load_embedder

    prompts = list(args.text)
    if args.file:
        with open(args.file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("give prompts as arguments or with --file")
    bank = Bank.open(args.bank)
    embedder = load_embedder(args.embedder or bank.spec.embedder_name)
    embedder.embed(["warm-up"])  # first call pays one-off allocation costs
    from memory_store.router import DocRouter

    router = DocRouter.load(bank.dir)  # as the model server routes: through the documents when the bank has them
    times = np.empty(len(prompts))
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        emb = embedder.embed([prompt])
        path = router.route_one(emb[0], prompt).path if router is not None else tuple(bank.tree.route(emb)[0].tolist())
        times[i] = time.perf_counter() - t0
        shown = list(path) if path is not None else None  # None: the router's gate gives no memory
        if args.json:
            print(json.dumps({"prompt": prompt, "path": shown, "ms": round(times[i] * 1e3, 3)}))
        elif not args.quiet:
            where = "/".join(map(str, shown)) if shown is not None else "(no memory)"
            print(f"{where:>16}  {times[i] * 1e3:7.2f} ms  {prompt[:70]}")
    summary = {"prompts": len(prompts), "p50_ms": float(np.percentile(times, 50) * 1e3),
               "p99_ms": float(np.percentile(times, 99) * 1e3), "mean_ms": float(times.mean() * 1e3)}
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        print(f"{summary['prompts']} prompts: p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, "
              f"mean {summary['mean_ms']:.2f} ms per prompt (embed + descent)", file=sys.stdout)
    return 0
