"""8-bit blocks hold what the float blocks hold (issue 30): a finished `bench.longtail_docs` build's bank
converted to int8 (`hiermem bank convert --dtype int8`: each row quantized with its own scale,
memory_store/quant.py) and evaluated exactly as the float bank was, side by side.

    python -m bench.longtail_int8 --work $HIERMEM_HOME/work/docs

Writes bench/results/longtail-docs-int8.{json,md}: recall of trained facts (all, and per popularity bucket)
and the held-out breakage for both dtypes, the bytes a path and the bank take, and the target: recall
within 1 point of the float blocks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bench.common import markdown_table, target, write_results

log = logging.getLogger(__name__)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a finished bench.longtail_docs work directory")
    ap.add_argument("--name", default="longtail-docs-int8")
    ap.add_argument("--eval-dtype", default="auto", choices=["float32", "bfloat16", "auto"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from memory_store import Bank
    from memory_store.ops import rewrite_bank
    from training.corpus import Corpus
    from training.evaluate import evaluate_longtail
    from training.pipeline import job_hidden_lookup

    work = Path(args.work)
    float_report = work / "eval" / "longtail.json"
    if not float_report.exists():
        raise SystemExit(f"{float_report} is missing: run bench.longtail_docs on {work} first")
    ref = json.loads(float_report.read_text())
    with Bank.open(work / "bank") as bank:
        if ref.get("bank_id") != bank.bank_id:
            raise SystemExit(f"{float_report} evaluated another bank than {work / 'bank'}: evaluate it again first")
        float_spec = bank.spec
    qdir = work / "bank-int8"
    if not (qdir / "manifest.json").exists():
        rewrite_bank(work / "bank", qdir, dtype="int8", progress=True)
    corpus_dir = work / "corpus"
    q = evaluate_longtail(qdir, corpus_dir, out_dir=work / "eval-int8",
                          hidden_lookup=job_hidden_lookup(work / "job", Corpus.load(corpus_dir).docs),
                          dtype=args.eval_dtype)
    with Bank.open(qdir) as qbank:
        q_spec = qbank.spec
    buckets = [str(b) for b in ref["buckets"]] + ["all"]
    rows = [{"dtype": name, **{f"trained, bucket {b}": r["accuracy"]["hierarchical"]["train"][b] for b in buckets},
             "held-out broken": r["broken"]["hierarchical"]["fraction"],
             "bytes per path": spec.fetched_bytes, "bank bytes": spec.bank_bytes}
            for name, r, spec in ((float_spec.dtype, ref, float_spec), ("int8", q, q_spec))]
    fa, qa = ref["accuracy"]["hierarchical"]["train"], q["accuracy"]["hierarchical"]["train"]
    rare = buckets[-2]
    targets = [target("int8 minus float: trained facts, all buckets", qa["all"] - fa["all"], ">=", -0.01),
               target(f"int8 minus float: trained facts, rarest bucket ({rare})", qa[rare] - fa[rare], ">=", -0.01),
               target("int8 minus float: held-out facts broken", q["broken"]["hierarchical"]["fraction"]
                      - ref["broken"]["hierarchical"]["fraction"], "<=", 0.01)]
    g = (q.get("general") or {}).get("systems", {}).get("auto (router + gate)")
    if g:
        targets.append(target("int8: general prompts, first 8 greedy tokens identical, auto vs off", g["identical"],
                              ">=", 0.95))
    figures = {"work": str(work), "float": {"bank_id": ref["bank_id"], "accuracy": ref["accuracy"],
                                            "broken": ref["broken"]},
               "int8": {"bank_id": q["bank_id"], "accuracy": q["accuracy"], "broken": q["broken"],
                        "general": q.get("general")},
               "bytes_per_path": {float_spec.dtype: float_spec.fetched_bytes, "int8": q_spec.fetched_bytes},
               "bank_bytes": {float_spec.dtype: float_spec.bank_bytes, "int8": q_spec.bank_bytes}}
    md = (f"The bank of `{work}` ({float_spec.dtype}) and its int8 conversion, evaluated the same way (completion "
          "probes, router + gate).\n\n" + markdown_table(rows))
    write_results(args.name, figures, targets, md)
    print(json.dumps(targets, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
