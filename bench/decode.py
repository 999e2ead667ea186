"""Decode speed of SmolLM2 anchor-only vs with hierarchical memory, against the memory-bandwidth floor.

docs/design.md §8: the extra time per decode step that memory costs must be <= 1.25 x (distinct memory bytes
read per step / memcpy bandwidth measured in the same run), at batch 1, at 8 distinct paths and at batch 16. Per-path memory of the
paper's proportion: r = (256, 64, 16) units on all 30 layers (17.4M params, 69.7 MB float32).

Batches:
  * b1: one path.
  * b8-distinct: 8 paths that share no block, level 1 included (8 clients with distinct memories).
  * b16-tree: 16 paths drawn as leaves of a 16/256/4096 tree (uniform leaves, so level-1 nodes repeat).
  * b16-l1=K (sharing sweep): 16 distinct paths whose level-1 nodes take K distinct values (K = 1, 4, 16).

The memory is the model server's: blocks synced into `SlotPools` (services/model_server/slot_memory.py), the
batch's rows pointing at them by index, in the compute dtype the server would pick (`--dtype auto`, i.e.
`lm.fast.prepare_for_inference`: measured here; the anchor's linears prepacked), blocks counted in that dtype.

Measurement: every condition is prefilled once into its own KV cache; then each round resets the caches to
the prefill length and runs `--steps` decode steps, alternating conditions at every step (A/B/A/B), because
the machine is shared and its speed drifts. Step times are medians over all steps of all rounds; the extra
time of memory is the median of the paired differences (memory step - the anchor step run beside it).
memcpy bandwidth (bench.common.memcpy_bandwidth over buffers of one path's bytes, one repeat) is measured
after every step pair too, and its median is used (a median like the step times, not a best-of).

Run: python -m bench.decode [--rounds 5 --steps 6 --threads 1 --dtype auto --quick --orientation both --name decode]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS_DIR, markdown_table, memcpy_bandwidth, target, write_results

log = logging.getLogger("bench.decode")
RANKS = (256, 64, 16)
BRANCHING = 16
PROMPT_LEN = 16


def tree_rows(kind: str, n_rows: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Paths (i1, i2, i3) with global indices per level (level-l index in 0..16^l - 1)."""
    if kind == "tree":
        leaves = rng.choice(BRANCHING ** 3, size=n_rows, replace=False)
        return [(int(x) // BRANCHING ** 2, int(x) // BRANCHING, int(x)) for x in leaves]
    k = int(kind)  # distinct level-1 nodes; rows spread round-robin over them; deeper nodes distinct
    l1 = rng.choice(BRANCHING, size=k, replace=False)
    paths = []
    for b in range(n_rows):
        i1 = int(l1[b % k])
        i2 = i1 * BRANCHING + (b // k) % BRANCHING
        i3 = i2 * BRANCHING + int(rng.integers(BRANCHING))
        paths.append((i1, i2, i3))
    return paths


def blocks_for(paths, n_layers: int, d: int, seed: int):
    """Distinct blocks of the batch by key (level, node) (random, small norm) and each row's keys."""
    from lm.synthetic import random_block

    blocks: dict[tuple[int, int], torch.Tensor] = {}
    rows = []
    for path in paths:
        row = []
        for level, node in enumerate(path):
            key = (level, node)
            if key not in blocks:
                blocks[key] = random_block(n_layers, RANKS[level], d, seed=seed + 7919 * level + node)
            row.append(key)
        rows.append(row)
    return blocks, rows


class Runner:
    """One condition: its KV cache prefilled to PROMPT_LEN; `reset()` then `step()` times one decode step."""

    def __init__(self, model, batch: int, memory, steps: int):
        from lm import KVCache

        self.model, self.memory, self.batch = model, memory, batch
        self.cache = KVCache(model.config, batch, PROMPT_LEN + steps + 1, dtype=model.dtype)
        self.slots = [self.cache.allocate() for _ in range(batch)]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT_LEN), generator=g)
        with torch.inference_mode():
            self.first = model(ids, cache=self.cache, slots=self.slots, memory=memory, last_only=True)[:, -1]
        self.reset()

    def reset(self) -> None:
        self.cache.lengths[self.slots] = PROMPT_LEN
        self.tok = self.first.argmax(-1)[:, None]

    def step(self) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = self.model(self.tok, cache=self.cache, slots=self.slots, memory=self.memory)
            self.tok = logits[:, -1].argmax(-1)[:, None]
            return time.perf_counter() - t0


def measure(model, name: str, paths, rounds: int, steps: int, path_bytes: int,
            orientations: dict[str, bool | None]) -> list[dict]:
    """`orientations`: condition name -> the memory products' orientation (None: measured, as the server does);
    a name ending in "-unfused" runs the path's blocks from their pools, never concatenated (SlotMemory)."""
    from services.model_server.slot_memory import SlotPools

    cfg = model.config
    blocks, rows_keys = blocks_for(paths, cfg.n_layers, cfg.d_model, seed=zlib.crc32(name.encode()) % 10_000)
    B = len(paths)
    runners = {"anchor": Runner(model, B, None, steps)}
    build_s: dict[str, float] = {}
    weight_first: dict[str, bool] = {}
    for cond, wf in orientations.items():
        pools = SlotPools(list(range(cfg.n_layers)), dtype=model.dtype, d=cfg.d_model, weight_first=wf)
        t0 = time.perf_counter()
        pools.sync(blocks)
        memory = pools.memory_for(rows_keys, fuse=not cond.endswith("-unfused"))  # as the runner's decode memory
        assert memory is not None
        distinct_bytes = memory.distinct_nbytes
        build_s[cond] = time.perf_counter() - t0
        weight_first[cond] = memory.weight_first
        runners[cond] = Runner(model, B, memory, steps)
    del blocks
    times: dict[str, list[float]] = {k: [] for k in runners}
    bws = []
    for _ in range(rounds):
        for r in runners.values():
            r.reset()
        for _ in range(steps):  # A/B/A/B at the step level: each condition's step i runs back to back
            for k, r in runners.items():
                times[k].append(r.step())
            bws.append(memcpy_bandwidth(path_bytes, repeats=1))  # the floor, measured beside the steps
    bw = statistics.median(bws)
    t_anchor = statistics.median(times["anchor"])
    floor = distinct_bytes / bw
    rows = []
    for s in orientations:
        t_mem = statistics.median(times[s])
        # paired estimate: median over steps of (memory step - the anchor step run beside it), with a
        # bootstrap 95% interval, because on the shared machine the noise can exceed the effect at batch 1
        diffs = np.array([m - a for m, a in zip(times[s], times["anchor"], strict=True)])
        extra = float(np.median(diffs))
        boot = np.median(np.random.default_rng(1).choice(diffs, (2000, diffs.size)), axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        rows.append({
            "batch": name, "condition": s,
            "orientation": ("weight-first" if weight_first[s] else "input-first") + ("-unfused" if s.endswith("-unfused") else ""),
            "rows": B, "dtype": str(model.dtype).removeprefix("torch."),
            "distinct_l1": len({p[0] for p in paths}), "distinct_blocks": len({(lv, n) for p in paths
                                                                                for lv, n in enumerate(p)}),
            "distinct_MB": distinct_bytes / 1e6, "memcpy_GBps": bw / 1e9,
            "anchor_ms": t_anchor * 1e3, "memory_ms": t_mem * 1e3, "extra_ms": extra * 1e3,
            "extra_ci95_ms": f"{lo * 1e3:.1f}..{hi * 1e3:.1f}",
            "extra_over_floor_ci95": f"{lo / floor:.2f}..{hi / floor:.2f}",
            "floor_ms": floor * 1e3, "extra_over_floor": extra / floor,
            "ratio_tps": t_anchor / t_mem, "best_ratio": t_anchor / (t_anchor + floor),
            "anchor_tok_s": B / t_anchor, "memory_tok_s": B / t_mem, "build_s": build_s[s],
            "steps_each": len(times[s]), "diffs_ms": [round(x * 1e3, 2) for x in diffs],
        })
        log.info("%s %s: anchor %.1f ms, memory %.1f ms, extra %.1f ms vs floor %.1f ms (%.2fx), ratio %.3f",
                 name, rows[-1]["orientation"], t_anchor * 1e3, t_mem * 1e3, extra * 1e3, floor * 1e3, extra / floor, t_anchor / t_mem)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["batch"] if len({q["orientation"] for q in rows}) == 1 else f"{r['batch']}\n{r['orientation']}"
              for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(x - 0.2, [r["extra_ms"] for r in rows], 0.4, label="extra time per step (memory - anchor)")
    ax.bar(x + 0.2, [r["floor_ms"] for r in rows], 0.4, label="floor: distinct bytes / memcpy bandwidth")
    ax.plot(x + 0.2, [1.25 * r["floor_ms"] for r in rows], "r_", markersize=20, label="target 1.25 x floor")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ms per decode step")
    ax.set_title("SmolLM2 decode: cost of memory r=(256,64,16) on 30 layers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="decode steps per condition per round")
    ap.add_argument("--orientation", default="auto", choices=["auto", "weight-first", "input-first", "both"],
                    help="the memory products' orientation: measured as the server does (auto), forced, or both "
                         "forced side by side (each paired with the anchor step)")
    ap.add_argument("--compare-unfused", action="store_true",
                    help="also run each condition without concatenating a path's blocks (SlotMemory's fuse)")
    ap.add_argument("--quick", action="store_true", help="b1, b8-distinct and b16-tree only")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype, as the model server's --dtype (auto: measured here)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the 2 cores are shared with other jobs, and a 2-thread "
                         "OpenMP team stalls whenever one thread is descheduled, which swings step times 5-10x; "
                         "one thread also matches the single-threaded numpy memcpy of the floor)")
    ap.add_argument("--name", default="decode", help="results file name (e.g. one per machine kind)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm import load_anchor
    from lm.fast import prepare_for_inference

    anchor = load_anchor("smollm2")
    model, cfg = anchor.model, anchor.config
    compute = prepare_for_inference(model, args.dtype)
    path_bytes = sum(3 * r * cfg.d_model * cfg.n_layers for r in RANKS) * model.dtype.itemsize
    rng = np.random.default_rng(0)
    plan: list[tuple[str, list, int]]
    plan = [("b1", [(3, 3 * 16 + 5, (3 * 16 + 5) * 16 + 9)], 4),
            # 8 clients, no block shared (level 1 included); its own generator, so that the other batches keep
            # the paths of the runs before it was added
            ("b8-distinct", tree_rows("8", 8, np.random.default_rng(8)), 2),
            ("b16-tree", tree_rows("tree", 16, rng), 1)]
    if not args.quick:
        plan += [(f"b16-l1={k}", tree_rows(str(k), 16, rng), 1) for k in (1, 4, 16)]
    choices: dict[str, dict[str, bool | None]] = {
        "auto": {"slots": None}, "weight-first": {"slots": True}, "input-first": {"slots": False},
        "both": {"slots-wf": True, "slots-if": False}}
    orientations = choices[args.orientation]
    if args.compare_unfused:  # beside each condition, the same with a batch-1 path's blocks left in their pools
        orientations = {**orientations, **{f"{k}-unfused": v for k, v in orientations.items()}}
    rows = []
    for name, paths, more in plan:  # batch 1 steps are cheap: take more of them (less noise)
        rows += measure(model, name, paths, args.rounds * more, args.steps, path_bytes, orientations)

    from services.model_server.slot_memory import measure_orientation

    server_wf, orientation = measure_orientation(model.dtype, cfg.d_model)  # what the server would run (cached)

    def pick(batch):  # the target is judged on the orientation the server would run, where both were measured
        cands = [r for r in rows if r["batch"] == batch and not r["condition"].endswith("-unfused")]
        return next((r for r in cands if (r["orientation"] == "weight-first") == server_wf), cands[0])

    targets = []
    for batch in ("b1", "b8-distinct", "b16-tree"):
        r = pick(batch)
        targets.append(target(f"{batch}: extra ms per step / (distinct bytes / memcpy bw)",
                              round(r["extra_over_floor"], 3), "<=", 1.25))
    cols = ["batch", "orientation", "dtype", "rows", "distinct_l1", "distinct_MB", "anchor_ms", "memory_ms", "extra_ms",
            "floor_ms", "extra_over_floor", "extra_over_floor_ci95", "ratio_tps", "best_ratio", "memcpy_GBps",
            "build_s"]
    md = ("Per decode step, medians over interleaved rounds (A/B/A/B). `extra_over_floor` = extra_ms / floor_ms, "
          "extra_ms = median of paired (memory step - anchor step), floor = distinct memory bytes / memcpy bandwidth measured in the same run; "
          "`ratio_tps` = memory-on tokens/s / anchor-only tokens/s; `best_ratio` = what the floor allows.\n\n"
          + markdown_table(rows, cols) + f"\n![decode]({args.name}.png)\n")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, args.results_dir / f"{args.name}.png")
    figures = {"rows": rows, "ranks": list(RANKS), "memory_layers": cfg.n_layers, "d_model": cfg.d_model,
               "path_params": path_bytes // model.dtype.itemsize, "compute": compute, "orientation": orientation, "prompt_len": PROMPT_LEN, "rounds": args.rounds,
               "steps": args.steps, "torch_threads": torch.get_num_threads()}
    command = "python -m bench.decode " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.name, figures, targets, md, command=command.strip(), results_dir=args.results_dir)
    print(markdown_table(rows, cols))
    for t in targets:
        print(f"{t['name']}: {t['value']} {t['op']} {t['target']} -> {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
