"""Machine-dependent compute choices: which dtype is fast here (measured, not assumed), and how many threads.

Machines of one kind differ: on a Xeon with AMX a bfloat16 matmul of a decode- or training-sized shape runs
several times faster than float32, on an EPYC without bf16 units it crawls. `fast_dtype()` times the same
matmul in both dtypes (a fraction of a second) and returns bfloat16 only where it wins clearly; the
measurement is logged and returned so callers can record it.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

_CACHE: dict[tuple[int, int, int], tuple[torch.dtype, dict]] = {}


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    torch.matmul(a, b)  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(m: int = 256, k: int = 576, n: int = 8192, repeats: int = 5) -> dict:
    """Best-of-`repeats` seconds of an (m, k) @ (k, n) matmul in float32 and in bfloat16."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    f32 = _best_time(a, b, repeats)
    bf16 = _best_time(a.bfloat16(), b.bfloat16(), repeats)
    return {"shape": [m, k, n], "float32_s": f32, "bfloat16_s": bf16, "speedup": f32 / max(bf16, 1e-12)}


def matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5, budget_s: float = 1.0) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul in `dtype` on the current torch threads: the yardstick of
    training throughput (training/throughput.py). A 256^3 probe comes first; where `repeats` matmuls of n would
    take more than `budget_s` (bfloat16 forced on a CPU without bfloat16 units crawls), a smaller n is timed."""
    g = torch.Generator().manual_seed(0)

    def operands(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(m, m, generator=g).to(dtype), torch.randn(m, m, generator=g).to(dtype)

    probe = _best_time(*operands(256), 1)
    while n > 256 and probe * (n / 256) ** 3 * (repeats + 1) > budget_s:
        n //= 2
    if n <= 256:
        return 2 * 256 ** 3 / max(probe, 1e-12)
    return 2 * n ** 3 / max(_best_time(*operands(n), repeats), 1e-12)


PROBE_SHAPE = (16, 576, 1024)  # 1/128 of the flops of the measured shape


def fast_dtype(choice: str = "auto", *, min_speedup: float = 1.3, shape: tuple[int, int, int] = (256, 576, 8192),
               probe_slowdown: float = 2.0) -> tuple[torch.dtype, dict]:
    """(dtype, measurement) for `choice` in "auto" | "float32" | "bfloat16"; "auto" measures (once per shape).

    A small probe comes first: where bfloat16 is more than `probe_slowdown` times slower than float32 on
    `PROBE_SHAPE` (no bfloat16 units: an AVX2 EPYC here took 14 s for one bfloat16 matmul of `shape`, 180
    times float32's, so the full measurement would have cost a minute and a half of start-up), float32 is
    chosen without it. A fast bfloat16 path is never slower than float32 on the probe."""
    if choice == "float32":
        return torch.float32, {"choice": "float32", "reason": "asked for"}
    if choice == "bfloat16":
        return torch.bfloat16, {"choice": "bfloat16", "reason": "asked for"}
    if choice != "auto":
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {choice!r}")
    if shape not in _CACHE:
        probe = measure(*PROBE_SHAPE, repeats=1)
        if probe["speedup"] < 1 / probe_slowdown:
            m, dtype = probe, torch.float32
            m["reason"] = (f"bfloat16 matmul {probe['speedup']:.3f}x float32 on a {PROBE_SHAPE} probe "
                           f"(below 1/{probe_slowdown:g}: not measured further)")
        else:
            m = measure(*shape)
            dtype = torch.bfloat16 if m["speedup"] >= min_speedup else torch.float32
            m["reason"] = f"bfloat16 matmul {m['speedup']:.2f}x float32 (threshold {min_speedup})"
        m["choice"] = "bfloat16" if dtype == torch.bfloat16 else "float32"
        log.info("compute dtype: %s (%s)", m["choice"], m["reason"])
        _CACHE[shape] = (dtype, m)
    return _CACHE[shape]


def busy_cores(interval: float = 0.5) -> float | None:
    """Cores busy with other work right now: the non-idle share of all CPU time in /proc/stat over
    `interval` seconds, times the cores (Linux; None elsewhere). Unlike the 1-minute load average, it does
    not still count work that has just ended (e.g. the pip install before a first build)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def pick_threads(spec: str | int) -> int:
    """'auto' -> cores minus the cores busy with other work (sampled now: `busy_cores`; the 1-minute load
    average where /proc/stat is missing), clipped to [1, cores]; else the number given. On a shared machine
    a thread team waiting for a descheduled member is slower than one thread."""
    cores = os.cpu_count() or 1
    if str(spec) != "auto":
        n = int(spec)
        if n < 1:
            raise SystemExit("threads must be >= 1 or 'auto'")
        return n
    load = busy_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # pragma: no cover - platforms without getloadavg
            return cores
    return max(1, min(cores, round(cores - load)))
