"""The first run as a new user has it: `bash scripts/run.sh` on a fresh clone, with a fresh `.venv` and
`$HIERMEM_HOME`, timed from the clone to the printed answer (issue 30: <= 15 minutes on every CPU kind).

    python -m bench.first_run              # clones HEAD (commit first: the clone has only what is committed)

Writes bench/results/first-run.{json,md}. The JSON keeps one entry per CPU kind (AMX, AVX-512 bfloat16,
AVX2 only), so a run on one kind leaves the others' figures in place. Each entry has the wall time and its
parts (setup, build stages, the stack and the answers), the training throughput the build reported (achieved
FLOP/s over the machine's matmul FLOP/s in the compute dtype, training/throughput.py), the answer printed
with memory on and off and whether it names the fact the corpus holds. pip's download cache is kept (a CI
machine has none: its setup may take longer than measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, machine_info, markdown_table, target, write_results  # noqa: E402
from bench.peer_systems import cpu_flags  # noqa: E402
from hiermem.launcher import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "first-run"
LIMIT_S = 900.0


def cpu_kind() -> str:
    """The CPU kinds the issues name, told apart by the flags that decide the compute dtype."""
    flags = set(cpu_flags())
    if not flags:
        return "unknown"
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    if "avx2" in flags:
        return "avx2"
    return "other"


def run_clone(tmp: Path) -> dict:
    """Clone, run scripts/run.sh with a fresh home; the log's lines with the seconds they appeared at."""
    clone, home = tmp / "clone", tmp / "home"
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIERMEM_", "VIRTUAL_ENV"))}
    env.update(HIERMEM_HOME=str(home), HIERMEM_UP_PORT=str(free_port()))
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p)
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(["bash", "scripts/run.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        print(f"[{lines[-1][0]:7.1f}s] {line}", end="", flush=True)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    build = home / "work" / "demo" / "build.json"
    return {"rc": rc, "wall": wall, "lines": lines,
            "build": json.loads(build.read_text()) if build.exists() else {},
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                     text=True).stdout.strip()}


def first_at(lines: list[tuple[float, str]], pattern: str) -> float | None:
    return next((t for t, line in lines if re.search(pattern, line)), None)


# the build's parts as its log states them (lm.weights, training.routing, training.prefix, training.scale)
LOGGED_PARTS = {"anchor_conversion": r"converted anchor \S+ in ([\d.]+)s",
                "embedding": r"embedded \d+ documents in ([\d.]+)s",
                "router_and_gate": r"router over \d+ documents .* in ([\d.]+)s",
                "prefix_cache": r"prefix cache of \d+ documents .* in ([\d.]+)s",
                "scale_choice": r"memory scale .* in ([\d.]+)s"}


def logged_parts(text: list[str]) -> dict[str, float]:
    out = {}
    for name, pattern in LOGGED_PARTS.items():
        m = next((m for line in text if (m := re.search(pattern, line))), None)
        if m:
            out[name] = float(m.group(1))
    return out


def summarize(run: dict) -> dict:
    lines = run["lines"]
    text = [line for _, line in lines]
    answers = [line.split(":", 1)[1].strip() for line in text if line.startswith("answer:")]
    says = next((m.group(1) for line in text if (m := re.search(r"the corpus says: (.*)\)", line))), None)
    posts = [json.loads(m.group(1)) for line in text if (m := re.search(r"POST /v1/completions (\{.*\})$", line))]
    prompt = posts[0]["prompt"] if posts else None
    stages = run["build"].get("stages", {})
    train = stages.get("train+export", {})
    building = first_at(lines, r"building the demo bank")
    bank = first_at(lines, r"^\[run\] bank:")
    up = first_at(lines, r"^hiermem is up")
    tp = train.get("throughput", {})
    on = answers[0] if answers else None
    off = answers[1] if len(answers) > 1 else None
    hit = (lambda a: bool(a) and bool(says) and a.lower().startswith(says.lower()))  # noqa: E731
    return {
        "commit": run["commit"], "rc": run["rc"], "wall_s": round(run["wall"], 1),
        "parts_s": {k: round(v, 1) if v is not None else None for k, v in {
            "setup_and_clone": building, "build": (bank - building) if bank and building else None,
            "stack_up": (up - bank) if up and bank else None, "answers": (run["wall"] - up) if up else None}.items()},
        "build_stages_s": {k: v.get("seconds") for k, v in stages.items()},
        "build_logged_s": logged_parts(text),
        "train": {k: train.get(k) for k in ("steps", "train_seconds", "tokens_seen")},
        "throughput": tp,
        "prompt": prompt, "corpus_answer": says, "answer_memory_auto": on, "answer_memory_off": off,
        "memory_right": hit(on), "anchor_right": hit(off),
    }


def report(doc: dict) -> tuple[list[dict], str]:
    runs = doc["runs"]
    rows, targets = [], []
    for kind, r in runs.items():
        tp = r.get("throughput") or {}
        rows.append({"cpu kind": kind, "cpu": r["machine"]["cpu_model"], "date": r["machine"]["date"][:16],
                     "commit": r["commit"], "wall s": r["wall_s"],
                     "setup s": r["parts_s"]["setup_and_clone"], "build s": r["parts_s"]["build"],
                     "training s": r["train"].get("train_seconds"),
                     "stack + answers s": (r["parts_s"]["stack_up"] or 0) + (r["parts_s"]["answers"] or 0),
                     "compute dtype": tp.get("compute_dtype"),
                     "GFLOP/s": tp.get("achieved_flops_per_s", 0) / 1e9,
                     "matmul GFLOP/s": tp.get("matmul_flops_per_s", 0) / 1e9,
                     "FLOP/s ratio": tp.get("flops_ratio")})
        targets.append(target(f"{kind}: first run wall time (s)", r["wall_s"], "<=", LIMIT_S))
        targets.append(target(f"{kind}: the memory answers the rare fact the anchor gets wrong",
                              float(r["memory_right"] and not r["anchor_right"]), ">=", 1.0))
    answers = [{"cpu kind": k, "prompt": json.dumps(r["prompt"]), "corpus says": r["corpus_answer"],
                "memory auto": r["answer_memory_auto"], "memory off": r["answer_memory_off"]}
               for k, r in runs.items()]
    parts = [{"cpu kind": k, **{f"{name} s": v for name, v in r.get("build_logged_s", {}).items()}}
             for k, r in runs.items()]
    md = ["First `bash scripts/run.sh` on a fresh clone (fresh `.venv` and `$HIERMEM_HOME`; pip's download "
          "cache kept), one row per CPU kind measured; kinds not listed were not measured with this demo.", "",
          markdown_table(rows), "", "Parts of the build as its log states them:", "", markdown_table(parts), "",
          "## The answers printed", "", markdown_table(answers), ""]
    return targets, "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone and its home (printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hiermem-first-run-"))
    try:
        run = run_clone(tmp)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    entry = {**summarize(run), "machine": machine_info()}
    old = RESULTS_DIR / f"{NAME}.json"
    runs = json.loads(old.read_text())["figures"].get("runs", {}) if old.exists() else {}
    if run["rc"] != 0:  # a failed run replaces no earlier figure
        raise SystemExit(f"scripts/run.sh failed with exit status {run['rc']}; results left as they were")
    runs[cpu_kind()] = entry
    targets, md = report({"runs": runs})
    write_results(NAME, {"runs": runs, "limit_s": LIMIT_S}, targets, md)
    print(json.dumps({k: entry[k] for k in ("wall_s", "parts_s", "memory_right", "anchor_right")}, indent=2))


if __name__ == "__main__":
    main()
