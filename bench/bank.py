"""Benchmark the paper-scale bank on this machine's disk (issue 3).

Figures: time to build the synthetic paper-scale bank (16/256/4,096 nodes, r = 256/64/16, all 30 layers
of SmolLM2's d = 576, float16, 2 shards) and peak RSS while building; block read latency p50/p99 per level
from a warm page cache and after evicting the bank's files from it; read throughput against a plain numpy
copy of the same bytes in the same run; RSS (anonymous and file-backed) while reading vs the bank size.

    python bench/bank.py [--bank DIR] [--time-build] [--samples 200]

The bank at $HIERMEM_HOME/banks/paper-smollm2 is reused when present (else built there, and timed).
`--time-build` also times a fresh build into a scratch directory next to it (removed afterwards).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from base.paths import home  # noqa: E402
from bench.common import markdown_table, memcpy_bandwidth, target, write_results  # noqa: E402
from memory_store import Bank, NodeRef  # noqa: E402


def rss_parts() -> dict[str, float]:
    """Current RssAnon / RssFile / VmHWM of this process in MiB (from /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[key] = int(val.split()[0]) / 1024
    return out


def build(bank_dir: Path) -> dict[str, float]:
    """Build the paper bank in a child process; wall time and the child's peak RSS."""
    cmd = [sys.executable, "-m", "hiermem.cli", "--log-level", "WARNING", "bank", "synth", "--preset",
           "paper-smollm2", "--shards", "2", "--out", str(bank_dir), "--force"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"build_s": wall, "build_peak_rss_mib": peak_kib / 1024}


def evict(bank_dir: Path) -> str:
    """Drop the bank's files from the page cache: per-file POSIX_FADV_DONTNEED (touches nothing else on
    the shared machine); falls back to /proc/sys/vm/drop_caches when that leaves pages resident."""
    files = sorted(bank_dir.glob("shards/*/level-*.safetensors"))
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    resident = resident_bytes(files)
    method = "posix_fadvise DONTNEED per file"
    if resident is not None and resident > 0.01 * sum(p.stat().st_size for p in files):
        try:
            subprocess.run(["sync"], check=False)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            method = f"fadvise left {resident / 1e6:.0f} MB resident, then drop_caches"
        except OSError:
            method = "posix_fadvise DONTNEED per file (drop_caches not permitted)"
        resident = resident_bytes(files)
    if resident is not None:
        method += f"; fincore after: {resident / 1e6:.0f} MB of the bank resident (pages other processes map stay)"
    return method


def resident_bytes(files) -> int | None:
    """Page-cache bytes of files according to util-linux fincore, or None when it is not installed."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                         capture_output=True, text=True, check=False).stdout
    return sum(int(x) for x in out.split() if x.isdigit())


def time_reads(bank: Bank, refs: list[NodeRef]) -> np.ndarray:
    """Seconds per `read_block_bytes(verify=True)`: locate, map and crc32c every byte of the block."""
    out = np.empty(len(refs))
    for i, ref in enumerate(refs):
        t0 = time.perf_counter()
        view = bank.read_block_bytes(ref, verify=True)
        out[i] = time.perf_counter() - t0
        del view
    return out


def time_warm_and_copies(bank: Bank, refs: list[NodeRef]) -> tuple[np.ndarray, np.ndarray]:
    """Warm reads interleaved with a plain numpy copy of the same cached bytes (the yardstick), block by
    block, so both see the same contention from the other work on the shared cores."""
    warm, copy = np.empty(len(refs)), np.empty(len(refs))
    dst = np.empty(bank.spec.bytes_per_block(refs[0].level), dtype=np.uint8)
    half = len(refs) // 2
    for i, ref in enumerate(refs):
        t0 = time.perf_counter()
        view = bank.read_block_bytes(ref, verify=True)
        warm[i] = time.perf_counter() - t0
        del view
        # copy a block half the list away, so neither measurement finds the other's bytes in CPU caches
        src = np.frombuffer(bank.read_block_bytes(refs[(i + half) % len(refs)], verify=False), dtype=np.uint8)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy[i] = time.perf_counter() - t0
        del src
    return warm, copy


def time_tensor_reads(bank: Bank, refs: list[NodeRef]) -> np.ndarray:
    out = np.empty(len(refs))
    for i, ref in enumerate(refs):
        t0 = time.perf_counter()
        bank.read_block(ref)
        out[i] = time.perf_counter() - t0
    return out


def plot(levels: dict, out: Path) -> None:
    """Cold vs warm p50 read latency per level, beside the numpy copy of the same bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lv = sorted(levels)
    x = np.arange(len(lv))
    copy_ms = [levels[i]["block_bytes"] / levels[i]["numpy_copy_gbps"] / 1e6 for i in lv]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for off, key, label in ((-0.27, "cold_p50_ms", "cold (after eviction)"), (0, "warm_p50_ms", "warm"),
                            (0.27, None, "numpy copy, same bytes")):
        vals = copy_ms if key is None else [levels[i][key] for i in lv]
        ax.bar(x + off, vals, width=0.27, label=label)
    ax.set_xticks(x, [f"level {i}\n{levels[i]['block_bytes'] / 1e6:.1f} MB" for i in lv])
    ax.set_yscale("log")
    ax.set_ylabel("p50 ms per block (crc32c checked)")
    ax.set_title("Paper-scale bank: block read latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, default=home() / "banks" / "paper-smollm2")
    ap.add_argument("--time-build", action="store_true", help="also time a fresh build into a scratch dir")
    ap.add_argument("--samples", type=int, default=200, help="blocks sampled per level (level 1: all 16)")
    ap.add_argument("--full-scan", action="store_true", help="also read every block once (RSS over the bank)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    figures: dict = {"bank": str(args.bank)}
    if not (args.bank / "manifest.json").exists():
        figures.update(build(args.bank))
        figures["build_dir"] = str(args.bank)
    elif args.time_build:
        scratch = args.bank.with_name(args.bank.name + "-bench-build")
        try:
            figures.update(build(scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        figures["build_dir"] = "scratch copy (removed)"
    bank = Bank.open(args.bank)
    spec = bank.spec
    figures["bank_id"] = bank.bank_id
    figures["bank_bytes"] = spec.bank_bytes
    figures["bank_params"] = spec.bank_params
    figures["fetched_bytes"] = spec.fetched_bytes
    rng = np.random.default_rng(args.seed)
    samples = {lv: [NodeRef(lv, int(i)) for i in rng.permutation(spec.nodes_at(lv))[:args.samples]]
               for lv in range(1, spec.depth + 1)}

    rows, levels = [], {}
    rss_before = rss_parts()
    for lv, refs in samples.items():
        nbytes = spec.bytes_per_block(lv)
        bank.close()
        method = evict(args.bank)
        bank = Bank.open(args.bank)
        cold = time_reads(bank, refs)
        time_reads(bank, refs)  # settle: the same blocks, now in the page cache and mapped
        warm, copies = time_warm_and_copies(bank, refs)
        warm_tensor = time_tensor_reads(bank, refs)
        memcpy = memcpy_bandwidth(nbytes, n_buffers=4, repeats=5)
        lvl = {
            "block_bytes": nbytes, "n": len(refs), "evict_method": method,
            "cold_p50_ms": float(np.percentile(cold, 50) * 1e3), "cold_p99_ms": float(np.percentile(cold, 99) * 1e3),
            "warm_p50_ms": float(np.percentile(warm, 50) * 1e3), "warm_p99_ms": float(np.percentile(warm, 99) * 1e3),
            "warm_tensor_p50_ms": float(np.percentile(warm_tensor, 50) * 1e3),
            "cold_gbps": nbytes / float(np.median(cold)) / 1e9, "warm_gbps": nbytes / float(np.median(warm)) / 1e9,
            "numpy_copy_gbps": nbytes / float(np.median(copies)) / 1e9,
            "memcpy_rotating_gbps": memcpy / 1e9,
        }
        lvl["warm_vs_copy"] = lvl["warm_gbps"] / lvl["numpy_copy_gbps"]
        lvl["cold_vs_copy"] = lvl["cold_gbps"] / lvl["numpy_copy_gbps"]
        levels[lv] = lvl
        rows.append({"level": lv, "block MB": nbytes / 1e6, "n": len(refs),
                     "cold p50 ms": lvl["cold_p50_ms"], "cold p99 ms": lvl["cold_p99_ms"],
                     "warm p50 ms": lvl["warm_p50_ms"], "warm p99 ms": lvl["warm_p99_ms"],
                     "tensor warm p50 ms": lvl["warm_tensor_p50_ms"],
                     "cold GB/s": lvl["cold_gbps"], "warm GB/s": lvl["warm_gbps"],
                     "numpy copy GB/s": lvl["numpy_copy_gbps"], "warm/copy": lvl["warm_vs_copy"],
                     "memcpy GB/s": lvl["memcpy_rotating_gbps"]})
    figures["levels"] = levels
    figures["rss_before_reads_mib"] = rss_before
    figures["rss_after_sampled_reads_mib"] = rss_parts()

    # A whole fetched path, cold and warm (what a bank shard serves per request).
    paths = [bank.tree.route(rng.standard_normal((1, spec.embedder_dim)).astype(np.float32))[0]
             for _ in range(20)]
    bank.close()
    evict(args.bank)
    bank = Bank.open(args.bank)
    path_cold, path_warm = [], []
    for p in paths:
        refs = [NodeRef(lv, int(i)) for lv, i in enumerate(p, start=1)]
        path_cold.append(time_reads(bank, refs).sum())
        path_warm.append(time_reads(bank, refs).sum())
    fetched = figures["fetched_bytes"]
    figures["path"] = {"cold_p50_ms": float(np.median(path_cold) * 1e3), "warm_p50_ms": float(np.median(path_warm) * 1e3),
                       "cold_gbps": fetched / float(np.median(path_cold)) / 1e9,
                       "warm_gbps": fetched / float(np.median(path_warm)) / 1e9}

    if args.full_scan:
        t0 = time.perf_counter()
        n = 0
        for lv in range(1, spec.depth + 1):
            for i in range(spec.nodes_at(lv)):
                view = bank.read_block_bytes(NodeRef(lv, i), verify=True)
                n += len(view)
                del view
        figures["full_scan"] = {"bytes": n, "s": time.perf_counter() - t0,
                                "gbps": n / (time.perf_counter() - t0) / 1e9, "rss_mib": rss_parts()}
    bank.close()
    figures["peak_rss_reads_mib"] = rss_parts()["VmHWM"]

    bank_mib = spec.bank_bytes / 2**20
    targets = [
        target("peak RSS while reading / bank size (anonymous + file-backed, high-water mark)",
               figures["peak_rss_reads_mib"] / bank_mib, "<=", 0.25),
    ]
    if "build_peak_rss_mib" in figures:
        targets.append(target("peak RSS while building / bank size", figures["build_peak_rss_mib"] / bank_mib,
                              "<=", 0.1))
    md = ["## Block reads (read_block_bytes with crc32c check; cold = after evicting the bank's files)", "",
          markdown_table(rows), "",
          f"Eviction: {levels[1]['evict_method']}.", "",
          "warm = read_block_bytes (locate + crc32c over every byte; google-crc32c only takes bytes, so "
          "this includes a copy in 4 MiB pieces); numpy copy = `np.copyto` of another cached block of the "
          "same level, interleaved block by block with the warm reads so both see the same contention "
          "(the yardstick); memcpy = bench.common's rotating-buffer copy of a buffer of the block's size "
          "(cache-resident for small blocks).", "",
          "## One path (3 blocks, " f"{fetched / 1e6:.1f} MB)", "",
          markdown_table([{"cold p50 ms": figures["path"]["cold_p50_ms"], "warm p50 ms": figures["path"]["warm_p50_ms"],
                           "cold GB/s": figures["path"]["cold_gbps"], "warm GB/s": figures["path"]["warm_gbps"]}]),
          "", "## Build and memory", "",
          markdown_table([{"bank GB": spec.bank_bytes / 1e9,
                           "build s": figures.get("build_s", "reused"),
                           "build peak RSS MiB": figures.get("build_peak_rss_mib", "n/a"),
                           "read peak RSS MiB (VmHWM)": figures["peak_rss_reads_mib"],
                           "RssAnon after reads MiB": figures["rss_after_sampled_reads_mib"].get("RssAnon"),
                           "RssFile after reads MiB": figures["rss_after_sampled_reads_mib"].get("RssFile")}])]
    if "full_scan" in figures:
        fs = figures["full_scan"]
        md += ["", f"Full scan: {fs['bytes'] / 1e9:.2f} GB in {fs['s']:.1f} s ({fs['gbps']:.2f} GB/s), RSS after: "
               f"{fs['rss_mib']}"]
    path = write_results("bank", figures, targets, "\n".join(md))
    plot(levels, path.with_suffix(".png"))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
