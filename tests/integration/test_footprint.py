"""Memory footprint of the model server as a process, with its defaults (SmolLM2, no bank): resident size after
start-up within budget, and no growth over a long run of mixed and bad requests (a leak, or the KV cache or
the request path holding what a finished or refused request left behind).

Figures come from the server's own /metrics (`hiermem_resident_bytes`, `hiermem_reserved_bytes{part}`).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration import procs

pytestmark = pytest.mark.integration

RSS_BUDGET = 1.5 * 2**30  # issue 11: RSS after start with defaults <= 1.5 GB
GROWTH_BUDGET = 0.20  # and no growth past +20% over a long run


def _gauge(text: str, name: str, label: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (label and "{" + label + "}")) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{label} not in /metrics")


def _round(url: str, i: int) -> None:
    """One round of the mix: good completions (short, longer, streamed, chat), streams dropped mid-way,
    and bad requests of every kind the API refuses."""
    good = [
        {"prompt": f"Round {i}: the capital of France is", "max_tokens": 8, "temperature": 0},
        {"prompt": "Write a list of fruits: " + "apple, " * (20 + i % 7), "max_tokens": 24, "temperature": 0.8,
         "seed": i},
    ]
    with httpx.Client(base_url=url, timeout=120) as http:
        for body in good:
            assert http.post("/v1/completions", json=body).status_code == 200
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"Hi {i}"}],
                                                     "max_tokens": 6})
        assert r.status_code == 200
        with http.stream("POST", "/v1/completions", json={"prompt": "Count: 1 2 3", "max_tokens": 40,
                                                          "stream": True, "ignore_eos": True}) as s:
            for n, _ in enumerate(s.iter_lines()):
                if n >= 3:
                    break  # the client goes away: the row is cancelled
        bad = [
            ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
            ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}),
            ("/v1/completions", {"prompt": "y " * 5000, "max_tokens": 4}),
            ("/v1/completions", {"prompt": ["a"] * 100}),
            ("/v1/completions", {"prompt": "x", "memory": [1, 2, 3]}),
            ("/v1/chat/completions", {"messages": []}),
            ("/generate", {"inputs": "x", "parameters": {"temperature": -1}}),
        ]
        for path, body in bad:
            assert 400 <= http.post(path, json=body).status_code < 500, (path, body)
        assert http.post("/v1/completions", content=b"{not json").status_code in (400, 422)
        assert http.post("/v1/completions", content=b"x" * (2 << 20),
                         headers={"content-type": "application/json"}).status_code == 413


def test_resident_size_after_start_and_over_a_long_run():
    proc = procs.start_process([sys.executable, "-m", "services.model_server", "--port", "0"], "model-server",
                               timeout=300)
    try:
        url = f"http://{proc.address}"
        start = httpx.get(url + "/metrics", timeout=30).text
        rss_start = _gauge(start, "hiermem_resident_bytes")
        parts = {p: _gauge(start, "hiermem_reserved_bytes", f'part="{p}"') / 2**20
                 for p in ("weights", "kv_cache", "memory_slots")}
        print(f"\nRSS after start {rss_start / 2**20:.0f} MiB; reserved MiB: {parts}")
        assert rss_start <= RSS_BUDGET, f"RSS after start {rss_start / 2**30:.2f} GiB > 1.5 GiB"
        _round(url, 0)  # warm-up: the first requests allocate what every later one reuses
        rss_warm = _gauge(httpx.get(url + "/metrics", timeout=30).text, "hiermem_resident_bytes")
        with ThreadPoolExecutor(4) as pool:  # concurrent rounds: rows join, leave and get cancelled together
            list(pool.map(lambda i: _round(url, i), range(1, 13)))
        rss_end = _gauge(httpx.get(url + "/metrics", timeout=30).text, "hiermem_resident_bytes")
        print(f"RSS after warm-up {rss_warm / 2**20:.0f} MiB, after 12 more rounds {rss_end / 2**20:.0f} MiB")
        assert rss_end <= rss_start * (1 + GROWTH_BUDGET), (rss_start, rss_warm, rss_end)
        assert rss_end <= RSS_BUDGET
    finally:
        proc.terminate()
