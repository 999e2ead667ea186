"""Shared plumbing for benchmarks: machine description, memcpy bandwidth, and the results files.

Every benchmark writes `bench/results/<name>.json` (machine, command, raw figures, targets), a Markdown
table `bench/results/<name>.md`, and optionally PNG plots, as docs/design.md §8 asks.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, torch and Python versions, and the date of the run."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
        torch_threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch_version, torch_threads = None, None
    mem_gib = None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": torch_threads,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def memcpy_bandwidth(nbytes: int, n_buffers: int = 4, repeats: int = 5) -> float:
    """Bytes per second of a plain numpy copy of `nbytes`, rotating over `n_buffers` sources so the
    CPU caches do not help (docs/design.md §8's "memcpy bandwidth"). Returns the best of `repeats` rounds."""
    n = max(1, nbytes)
    srcs = [np.ones(n, dtype=np.uint8) for _ in range(n_buffers)]
    dst = np.empty(n, dtype=np.uint8)
    np.copyto(dst, srcs[0])  # fault pages in
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in srcs:
            np.copyto(dst, s)
        dt = time.perf_counter() - t0
        best = max(best, n * n_buffers / dt)
    return best


def target(name: str, value: float, op: str, goal: float) -> dict[str, Any]:
    """One entry of the `targets` list: met is computed, never asserted."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', got {op!r}")
    met = bool(value >= goal) if op == ">=" else bool(value <= goal)
    return {"name": name, "value": value, "op": op, "target": goal, "met": met}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    rows = [
        {"target": t["name"], "value": t["value"], "goal": f"{t['op']} {t['target']}",
         "met": "yes" if t["met"] else "**NO**"}
        for t in targets
    ]
    return markdown_table(rows)


def _command_line() -> str:
    """How this run was started, as a user would retype it from the repo root (`python -m bench.x ...`)."""
    argv0 = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    root = RESULTS_DIR.parent.parent
    if argv0 is not None and argv0.suffix == ".py" and argv0.is_relative_to(root):
        module = ".".join(argv0.relative_to(root).with_suffix("").parts)
        return " ".join(["python", "-m", module, *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def write_results(name: str, figures: dict[str, Any], targets: Sequence[dict[str, Any]],
                  tables_md: str, command: str | None = None, results_dir: Path | None = None) -> Path:
    """Write `<name>.json` and `<name>.md`; returns the JSON path."""
    out_dir = Path(results_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = command or _command_line()
    m = machine_info()
    doc = {"name": name, "machine": m, "command": cmd, "figures": figures, "targets": list(targets)}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    md = [f"# Benchmark `{name}`", "",
          f"Machine: {m['cores']} cores, {m['cpu_model']}, {m['memory_gib']} GiB, torch {m['torch']}, "
          f"Python {m['python']}, {m['date']}", "", f"Command: `{cmd}`", "", tables_md.rstrip(), ""]
    if targets:
        md += ["## Targets", "", targets_table(targets)]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    return json_path
