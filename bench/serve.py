"""Serving benchmark: SmolLM2 + a synthetic bank of the paper's block shapes, N concurrent streaming clients
whose memory paths follow a Zipf law; memory on vs off, subtree-aware vs FIFO scheduler (issue 5).

    python bench/serve.py                       # 16 clients, writes bench/results/serve.{json,md,png}
    python bench/serve.py --quick               # a smaller run to check the harness
    python bench/serve.py --bank $HIERMEM_HOME/banks/demo --name serve-demo   # trained demo bank

The bank has r = (256, 64, 16) on all 30 layers of SmolLM2 (d = 576), like the paper's, with a 16/4/4
branching (16 / 64 / 256 nodes, 1.3 GB in float16) so it builds in seconds; it is cached under
$HIERMEM_HOME/banks/serve-bench-smollm2. A request names its path explicitly (`memory: [i1, i2, i3]`, the
leaf drawn from a Zipf law over the 256 leaves): a random tree gives no prompt a meaningful route, and
routing cost is measured by bench/route.py. Each configuration runs in its own server process
(`python -m services.model_server`, blocks read from the local bank files), one after the other on the same
machine, with the same request list.

Figures from the server's /metrics (before/after each run): decode steps and time, rows per step, distinct
memory bytes per decode step, block cache hits/misses; from the clients: tokens/s, TTFT and end-to-end
p50/p99.

Targets (issue 5, at 16 concurrent clients):
* memory-on throughput >= 0.85 x what the decode cost of docs/design.md §8 allows for the distinct blocks
  actually batched: allowed = off_throughput x t_off / (t_off + distinct_bytes_per_step / memcpy_bw), where t_off is
  the anchor-only decode step time measured in the memory-off run;
* the subtree-aware scheduler reads >= 25% fewer distinct memory bytes per decode step than FIFO on the
  same load, with p99 TTFT no worse than 1.5x FIFO's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, markdown_table, memcpy_bandwidth, target, write_results  # noqa: E402

log = logging.getLogger("bench.serve")

WORDS = ("river mountain theory engine history music planet garden market signal window protein "
         "harbor language circuit forest museum bridge season crystal ocean ladder violin desert").split()


def ensure_bank(out: Path, branching: list[int]) -> Path:
    """The bench bank (SmolLM2 identity, paper ranks, all layers); built once and reused."""
    import torch

    from lm import load_anchor
    from memory_store import AnchorIdentity, Bank, BankSpec
    from memory_store.synth import synth_bank

    anchor = load_anchor("smollm2")
    identity = AnchorIdentity(**anchor.identity)
    c = anchor.config
    del anchor
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if (out / "manifest.json").exists():
        bank = Bank.open(out)
        if list(bank.spec.branching) == branching and bank.anchor.hash == identity.hash:
            return out
    spec = BankSpec(branching=branching, ranks=[256, 64, 16], memory_layers=list(range(c.n_layers)),
                    n_layers=c.n_layers, d_model=c.d_model, dtype="float16")
    log.info("building the bench bank at %s (%.2f GB)", out, spec.bank_bytes / 1e9)
    synth_bank(out, spec, 2, anchor=identity, overwrite=True)
    return out


def make_workload(n_clients: int, per_client: int, branching: list[int], zipf_s: float, seed: int
                  ) -> list[list[dict[str, Any]]]:
    """Per client, its requests: prompt and leaf path; leaves ranked by a random permutation, P(rank k)
    proportional to k^-s."""
    rng = np.random.default_rng(seed)
    n_leaves = int(np.prod(branching))
    order = rng.permutation(n_leaves)
    p = 1.0 / np.arange(1, n_leaves + 1) ** zipf_s
    p /= p.sum()
    work = []
    for _ in range(n_clients):
        reqs = []
        for _ in range(per_client):
            leaf = int(order[rng.choice(n_leaves, p=p)])
            path, idx = [], leaf
            for lv in range(len(branching), 0, -1):
                path.append(idx)
                idx //= branching[lv - 1]
            words = " ".join(rng.choice(WORDS, 12))
            reqs.append({"prompt": f"Write a short note about {words}.", "path": path[::-1]})
        work.append(reqs)
    return work


def start_server(bank: Path, scheduler: str, max_batch: int, cache_bytes: int, max_queue: int,
                 dtype: str = "auto", torch_threads: int = 0):
    from tests.integration.procs import start_process

    cmd = [sys.executable, "-m", "services.model_server", "--anchor", "smollm2", "--bank", str(bank),
           "--port", "0", "--scheduler", scheduler, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
           "--cache-bytes", str(cache_bytes), "--pinned-levels", "1", "--max-seq-len", "256",
           "--dtype", dtype, "--torch-threads", str(torch_threads)]
    proc = start_process(cmd, f"model-server {scheduler}", timeout=300)
    import httpx

    url = f"http://{proc.address}"
    while httpx.get(url + "/ready", timeout=5).status_code != 200:
        time.sleep(0.2)
    return proc, url


def scrape(url: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _sum(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


async def run_clients(url: str, work: list[list[dict[str, Any]]], memory_on: bool, max_tokens: int
                      ) -> list[dict[str, float]]:
    import httpx

    results: list[dict[str, float]] = []

    async def client(reqs: list[dict[str, Any]], http: httpx.AsyncClient) -> None:
        for r in reqs:
            body = {"prompt": r["prompt"], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "memory": r["path"] if memory_on else "off"}
            t0 = time.perf_counter()
            ttft, n = None, 0
            while True:
                async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                    if resp.status_code == 429:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk["choices"][0].get("finish_reason") is None:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                        else:
                            n = chunk["usage"]["completion_tokens"]
                break
            results.append({"ttft": ttft or 0.0, "e2e": time.perf_counter() - t0, "tokens": n})

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(work) + 4)) as http:
        await asyncio.gather(*(client(reqs, http) for reqs in work))
    return results


def run_config(bank: Path, name: str, scheduler: str, memory_on: bool, work, args) -> dict[str, Any]:
    proc, url = start_server(bank, scheduler, args.max_batch, args.cache_bytes, max_queue=4 * args.clients,
                             dtype=args.dtype, torch_threads=args.torch_threads)
    try:
        warm = [[{"prompt": "Warm up the kernels.", "path": work[0][0]["path"]}] for _ in range(2)]
        asyncio.run(run_clients(url, warm, memory_on, 4))
        before = scrape(url)
        t0 = time.perf_counter()
        res = asyncio.run(run_clients(url, work, memory_on, args.max_tokens))
        wall = time.perf_counter() - t0
        after = scrape(url)
    finally:
        proc.terminate()
    d = {k: _sum(after, k) - _sum(before, k) for k in (
        "hiermem_decode_steps_total", "hiermem_decode_rows_total", "hiermem_decode_seconds_total",
        "hiermem_decode_memory_bytes_total", "hiermem_block_cache_hits_total", "hiermem_block_cache_misses_total",
        "hiermem_memory_rebuild_seconds_total")}
    steps = max(d["hiermem_decode_steps_total"], 1)
    ttft = np.array([r["ttft"] for r in res])
    e2e = np.array([r["e2e"] for r in res])
    tokens = sum(r["tokens"] for r in res)
    lookups = d["hiermem_block_cache_hits_total"] + d["hiermem_block_cache_misses_total"]
    row = {
        "config": name, "scheduler": scheduler, "dtype": args.dtype, "memory": "on" if memory_on else "off", "requests": len(res),
        "tokens": tokens, "wall_s": wall, "throughput_tok_s": tokens / wall,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "e2e_p50_s": float(np.percentile(e2e, 50)), "e2e_p99_s": float(np.percentile(e2e, 99)),
        "decode_steps": int(steps), "rows_per_step": d["hiermem_decode_rows_total"] / steps,
        "decode_step_ms": 1000 * d["hiermem_decode_seconds_total"] / steps,
        "distinct_memory_mb_per_step": d["hiermem_decode_memory_bytes_total"] / steps / 1e6,
        "rebuild_s": d["hiermem_memory_rebuild_seconds_total"],
        "cache_hit_rate": d["hiermem_block_cache_hits_total"] / lookups if lookups else float("nan"),
    }
    log.info("%s: %s", name, json.dumps(row))
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = [r["config"] for r in rows]
    for ax, key, title in zip(axes, ("throughput_tok_s", "ttft_p99_s", "distinct_memory_mb_per_step"),
                              ("throughput (tokens/s)", "p99 TTFT (s)", "distinct memory MB / decode step"),
                              strict=True):
        ax.bar(names, [r[key] for r in rows], color=["#999999", "#d08c60", "#4c72b0", "#55a868", "#8172b2"][:len(rows)])
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8, help="KV slots; fewer than clients so requests queue")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--branching", default="16,4,4")
    p.add_argument("--cache-bytes", type=int, default=3 * 2**30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank", type=Path, default=None, help="bank dir (default: build the bench bank)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the server's --dtype (auto: measured at its start-up)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="the server's --torch-threads (0 = torch's default, one per core)")
    p.add_argument("--quick", action="store_true", help="4 clients x 2 requests, 8 tokens")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default=None, help="results name (default serve; e.g. serve-demo with --bank)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.clients, args.requests_per_client, args.max_tokens, args.max_batch = 4, 2, 8, 2
    from base.paths import home

    branching = [int(x) for x in args.branching.split(",")]
    bank = args.bank or ensure_bank(home() / "banks" / "serve-bench-smollm2", branching)
    from memory_store import Bank

    spec = Bank.open(bank).spec
    branching = list(spec.branching)
    path_bytes_f32 = spec.fetched_params * 4
    work = make_workload(args.clients, args.requests_per_client, branching, args.zipf, args.seed)
    rows = [run_config(bank, "off", "subtree", False, work, args),
            run_config(bank, "on-fifo", "fifo", True, work, args),
            run_config(bank, "on-subtree", "subtree", True, work, args)]
    bw = memcpy_bandwidth(path_bytes_f32)
    off, fifo, sub = rows[:3]
    t_off = off["decode_step_ms"] / 1000
    for r in rows[1:]:
        floor_s = r["distinct_memory_mb_per_step"] * 1e6 / bw
        r["allowed_tok_s"] = off["throughput_tok_s"] * t_off / (t_off + floor_s)
        r["vs_allowed"] = r["throughput_tok_s"] / r["allowed_tok_s"]
        r["extra_step_ms"] = r["decode_step_ms"] - off["decode_step_ms"]
        r["floor_extra_ms"] = 1000 * floor_s
        r["ratio_on_off"] = r["throughput_tok_s"] / off["throughput_tok_s"]
    cut = 1 - sub["distinct_memory_mb_per_step"] / fifo["distinct_memory_mb_per_step"]
    ttft_ratio = sub["ttft_p99_s"] / fifo["ttft_p99_s"]
    targets = [
        target("memory-on (subtree) throughput / allowed by decode cost", sub["vs_allowed"], ">=", 0.85),
        target("subtree vs FIFO: cut in distinct memory bytes per step", cut, ">=", 0.25),
        target("subtree vs FIFO: p99 TTFT ratio", ttft_ratio, "<=", 1.5),
    ]
    figures = {"rows": rows, "memcpy_bandwidth_gb_s": bw / 1e9, "path_bytes_f32": path_bytes_f32,
               "bank": str(bank), "bank_spec": spec.model_dump(), "clients": args.clients,
               "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
               "max_batch": args.max_batch, "torch_threads": args.torch_threads, "zipf_s": args.zipf, "dtype": args.dtype, "distinct_bytes_cut": cut,
               "ttft_p99_ratio": ttft_ratio}
    cols = ["config", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s", "rows_per_step",
            "decode_step_ms", "distinct_memory_mb_per_step", "cache_hit_rate", "allowed_tok_s", "vs_allowed",
            "ratio_on_off", "extra_step_ms", "floor_extra_ms", "rebuild_s"]
    table = (f"{args.clients} streaming clients x {args.requests_per_client} requests, {args.max_tokens} tokens "
             f"each, max_batch {args.max_batch}, torch threads {args.torch_threads or 'default'}, Zipf s={args.zipf} over {int(np.prod(branching))} leaves; "
             f"memcpy {bw / 1e9:.2f} GB/s.\n\n" + markdown_table(rows, cols))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or ("serve" if not args.quick else "serve-quick")
    plot(rows, args.results_dir / f"{name}.png")
    write_results(name, figures, targets, table, results_dir=args.results_dir)
    print(table)
    for t in targets:
        print(f"{t['name']}: {t['value']:.3f} {t['op']} {t['target']} -> {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
