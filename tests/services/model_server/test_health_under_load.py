"""Issue 12, finding 3: huge prompts must not stall the event loop. A real server process (tiny anchor, no
bank) on loopback; 4 clients send ~1 MB prompts (all refused, 400) back to back while a probe times
`/health`; its p99 must stay under 100 ms. Bounded: a fixed time per run and a fixed probe interval.

`python -m tests.services.model_server.test_health_under_load [seconds]` prints the figures for every body
in BODIES (1 MB text, token-id and chat prompts, 30k messages, and prompts just under the size at which the
server refuses without tokenizing)."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.procs import ManagedProcess

REPO = Path(__file__).resolve().parents[3]
CLIENTS = 4
PROBE_EVERY_S = 0.02


def start_server() -> tuple[ManagedProcess, str]:
    proc = ManagedProcess([sys.executable, "-m", "services.model_server", "--anchor", "tiny", "--port", "0",
                           "--max-batch", "2", "--torch-threads", "1", "--log-level", "INFO"],
                          "model-server", cwd=REPO)
    proc.wait_listening(120)
    assert proc.address is not None
    return proc, "http://" + proc.address


def text_prompt(chars: int) -> dict:
    return {"prompt": ("lorem ipsum " * (chars // 12 + 1))[:chars], "max_tokens": 1}


BODIES = {  # each about 1 MB, each refused (400)
    "1 MB text prompt": ("/v1/completions", text_prompt(1_000_000)),
    "1 MB token-id prompt": ("/v1/completions", {"prompt": [11] * 330_000, "max_tokens": 1}),
    "1 MB chat message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 1_000_000}]}),
    "30k chat messages": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y"}] * 30_000}),
    "160k-char prompt (tokenized, then 400)": ("/v1/completions", text_prompt(160_000)),
}


def measure(url: str, body: dict | int, seconds: float, path: str = "/v1/completions") -> dict:
    """Health latencies while `CLIENTS` clients send `body` (or a text prompt of that many characters) to
    `path` back to back for `seconds`."""
    stop = threading.Event()
    statuses: list[int] = []
    if isinstance(body, int):
        body = text_prompt(body)

    # encoded once: the load threads share this process with the probe, and json-encoding 1 MB per request
    # would hold the GIL and time the test's own threads instead of the server
    content = json.dumps(body).encode()

    def client() -> None:
        with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as http:
            while not stop.is_set():
                statuses.append(http.post(url + path, content=content).status_code)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for w in workers:
        w.start()
    time.sleep(0.5)  # let the load start
    lat: list[float] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            assert http.get(url + "/health").status_code == 200
            lat.append(time.perf_counter() - t0)
            time.sleep(PROBE_EVERY_S)
    stop.set()
    for w in workers:
        w.join(60)
    lat.sort()
    return {"probes": len(lat), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "max_ms": 1000 * lat[-1],
            "big_requests": len(statuses), "statuses": sorted(set(statuses))}


@pytest.mark.slow
def test_health_p99_under_100ms_while_4_clients_send_1mb_prompts():
    """Target 100 ms. The baseline is the same 4 clients sending small completions. On a machine busy with
    other work /health is slow even then; when the baseline p99 is over 50 ms the bound is 2 x baseline p99
    + 50 ms, which still fails the old server (p99 1.8 s: it tokenized each 1 MB prompt on the event loop)."""
    proc, url = start_server()
    try:
        idle = measure(url, 10, seconds=3.0)  # baseline
        got = measure(url, 1_000_000, seconds=6.0)
    finally:
        proc.terminate()
    print({"idle": idle, "1 MB prompts": got})
    assert got["statuses"] == [400] and got["big_requests"] >= 2 * CLIENTS, got  # the load was real
    assert got["probes"] >= 50, got
    bound = 100.0 if idle["p99_ms"] <= 50 else 2 * idle["p99_ms"] + 50
    assert got["p99_ms"] <= bound, (got, idle)


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    server, base = start_server()
    try:
        print("baseline (small prompts, 200):", measure(base, 10, secs))
        for name, (where, doc) in BODIES.items():
            print(f"{name}:", measure(base, doc, secs, where))
    finally:
        server.terminate()
