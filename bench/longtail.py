"""Long-tail facts benchmark (issue 6): runs `hiermem build --preset facts` (or reuses its output) and
checks the targets: first-run wall time, rarest-bucket accuracy, hierarchical vs generic, held-out facts
broken, deletion.

    python bench/longtail.py            # reuse $HIERMEM_HOME/work/facts if it has finished, else build
    python bench/longtail.py --fresh    # build from scratch in a new work directory (first-run time)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, markdown_table, target, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="delete the facts work directory and build again")
    ap.add_argument("--work", default=None, help="work directory (default $HIERMEM_HOME/work/facts)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from base.paths import home
    from training.evaluate import markdown
    from training.pipeline import run_build

    work = Path(args.work) if args.work else home() / "work" / "facts"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    out = run_build("facts", work=work)
    this_run = time.perf_counter() - t0
    status, r = out["status"], out["result"]
    from training.pipeline import build_wall_seconds

    first_run = build_wall_seconds(status)
    acc = r["accuracy"]
    rare = str(max(r["buckets"]))
    hier_rare = acc["hierarchical"]["train"][rare]
    anchor_rare = acc["anchor"]["train"][rare]
    hier_all, generic_all = acc["hierarchical"]["train"]["all"], acc["generic"]["train"]["all"]
    broken = r["broken"]["hierarchical"]["fraction"]
    d = r["deletion"]
    inside_gap = abs(d["inside"]["hierarchical_deleted"] - d["inside"]["anchor"])
    rest_move = abs(d["rest"]["hierarchical_deleted"] - d["rest"]["hierarchical"])
    targets = [
        target("first-run wall time of `hiermem build --preset facts` (s)", round(first_run, 1), "<=", 1200),
        target(f"hierarchical, rarest bucket ({rare}), trained facts", hier_rare, ">=", 0.90),
        target("hierarchical minus anchor, rarest bucket, trained facts", hier_rare - anchor_rare, ">=", 0.50),
        target("hierarchical minus generic, all trained facts (same epochs)", hier_all - generic_all, ">=", 0.10),
        target("held-out facts the anchor knew that the memory broke (fraction)", broken, "<=", 0.10),
        target("deletion: deleted subtree's facts vs anchor (abs. difference)", inside_gap, "<=", 0.10),
        target("deletion: the rest of the facts move (abs. difference)", rest_move, "<=", 0.02),
    ]
    stages = [{"stage": k, "seconds": v["seconds"], "load 1m at end": v.get("loadavg_1m_at_end", "")}
              for k, v in status["stages"].items()]
    figures = {"build_status": status, "eval": r, "this_run_seconds": this_run,
               "loadavg_at_bench_start": load_before, "loadavg_at_bench_end": os.getloadavg()}
    tables = ("## Stages of the first run\n\n" + markdown_table(stages) + "\n## Exact match\n\n" + markdown(r))
    write_results("longtail", figures, targets, tables, command="python bench/longtail.py"
                  + (" --fresh" if args.fresh else ""))
    png = work / "eval" / "longtail.png"
    if png.exists():
        shutil.copyfile(png, RESULTS_DIR / "longtail.png")
    print(json.dumps(targets, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
