"""Fetch latency and bandwidth of whole paths from bank shard servers on loopback (docs/design.md §8).

Starts one `serve-bank` subprocess per shard of the paper-scale synthetic bank, then measures with the real
BankClient:

* whole paths (levels 1+2+3) and paths with level 1 resident client-side (levels 2+3), each
  - cold: the blocks' pages dropped from the OS page cache first (posix_fadvise DONTNEED), so the server
    reads them from disk, and
  - warm: the same paths again, served from the page cache;
* next to a raw loopback TCP transfer of the same number of bytes (another process sending from RAM into
  `recv_into`), the grpc.aio floor (a trivial server streaming the same bytes as 1 MiB messages that the
  client drops) and a numpy memcpy of them, measured in the same run;
* N concurrent clients (processes) fetching random whole paths for S seconds, starting from a cold page
  cache: throughput, p50/p99, errors.

    python -m bench.fetch [--bank DIR] [--paths 20] [--clients 8] [--seconds 30]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import markdown_table, memcpy_bandwidth, target, write_results

log = logging.getLogger("bench.fetch")
REPO = Path(__file__).resolve().parents[1]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _summary(name: str, nbytes: list[int], seconds: list[float]) -> dict:
    lat_ms = [s * 1e3 for s in seconds]
    return {"case": name, "n": len(seconds), "MB/fetch": statistics.mean(nbytes) / 1e6,
            "p50_ms": _pct(lat_ms, 50), "p99_ms": _pct(lat_ms, 99), "mean_ms": statistics.mean(lat_ms),
            "GB/s_p50": statistics.mean(nbytes) / (_pct(seconds, 50) * 1e9),
            "GB/s_mean": sum(nbytes) / (sum(seconds) * 1e9)}


def drop_page_cache(bank_dir: Path) -> None:
    """Evict the bank's shard files from the OS page cache (clean pages; no root needed)."""
    for path in (bank_dir / "shards").rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- raw loopback socket baseline -----------------------------------------------------------------------

def _socket_sender(port_q, max_bytes: int) -> None:
    payload = np.random.default_rng(0).integers(0, 255, max_bytes, dtype=np.uint8).tobytes()
    view = memoryview(payload)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            while True:
                ask = conn.recv(8)
                if len(ask) < 8:
                    return
                conn.sendall(view[:int.from_bytes(ask, "little")])


class LoopbackSocket:
    """Raw TCP on loopback from another process's RAM into `recv_into`: the transport floor."""

    def __init__(self, max_bytes: int) -> None:
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_socket_sender, args=(q, max_bytes), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(("127.0.0.1", q.get(timeout=30)))
        self.buf = memoryview(bytearray(max_bytes))

    def transfer(self, nbytes: int) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(nbytes.to_bytes(8, "little"))
        got = 0
        while got < nbytes:
            n = self.sock.recv_into(self.buf[got:nbytes], nbytes - got)
            if not n:
                raise RuntimeError("sender closed early")
            got += n
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.proc.join(10)


# --- grpc floor: a trivial grpc.aio server streaming pre-built 1 MiB messages -------------------------------

def _grpc_floor_server(port_q, chunk_bytes: int) -> None:
    import asyncio

    import grpc

    async def serve() -> None:
        payload = np.random.default_rng(0).integers(0, 255, chunk_bytes, dtype=np.uint8).tobytes()

        async def stream(request: bytes, context):
            for _ in range(int.from_bytes(request, "little")):
                yield payload

        handler = grpc.method_handlers_generic_handler("floor.Floor", {"Stream": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=lambda b: b, response_serializer=lambda b: b)})
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
        server.add_generic_rpc_handlers((handler,))
        port_q.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


class GrpcFloor:
    """What grpc.aio itself costs: N messages of `chunk_bytes` from another process, received and dropped
    (no disk, no checksum, no copy into a tensor)."""

    def __init__(self, chunk_bytes: int = 2**20) -> None:
        import asyncio

        import grpc

        ctx = mp.get_context("fork")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_grpc_floor_server, args=(q, chunk_bytes), daemon=True)
        self.proc.start()
        self.chunk_bytes = chunk_bytes
        self.loop = asyncio.new_event_loop()
        port = q.get(timeout=60)

        async def connect():
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                     options=[("grpc.max_receive_message_length", 8 << 20)])
            return self.channel.unary_stream("/floor.Floor/Stream", request_serializer=lambda b: b,
                                             response_deserializer=lambda b: b)

        self.call = self.loop.run_until_complete(connect())

    def transfer(self, nbytes: int) -> float:
        n = -(-nbytes // self.chunk_bytes)

        async def go():
            async for _ in self.call(n.to_bytes(4, "little")):
                pass

        t0 = time.perf_counter()
        self.loop.run_until_complete(go())
        return time.perf_counter() - t0

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()
        self.proc.kill()


# --- shard servers ----------------------------------------------------------------------------------------

def start_shards(bank_dir: Path, shard_ids: list[str], extra: list[str]):
    sys.path.insert(0, str(REPO))
    from tests.integration import procs

    started = [procs.ManagedProcess(procs.bank_shard_cmd(bank_dir, sid, extra_args=extra), f"shard {sid}")
               for sid in shard_ids]
    for p in started:
        p.wait_listening(120)
    return started


def _random_paths(bank, n: int, seed: int) -> list[tuple[int, ...]]:
    emb = np.random.default_rng(seed).standard_normal((n, bank.tree.dim)).astype(np.float32)
    return [tuple(int(i) for i in p) for p in bank.tree.route(emb)]


def _timed_fetches(client, ref_lists) -> tuple[list[int], list[float], int]:
    nbytes, seconds, errors = [], [], 0
    for refs in ref_lists:
        t0 = time.perf_counter()
        r = client.fetch(refs, timeout_s=30)
        seconds.append(time.perf_counter() - t0)
        nbytes.append(r.nbytes)
        errors += len(r.failed)
    return nbytes, seconds, errors


# --- concurrency ------------------------------------------------------------------------------------------

def _client_worker(bank_dir: str, addresses: dict, seconds: float, seed: int, barrier, out) -> None:
    from memory_store import Bank, path_refs
    from services.memory_bank.client import BankClient

    bank = Bank.open(bank_dir)
    paths = _random_paths(bank, 10_000, seed)
    lat, nbytes, errors, i = [], 0, 0, 0
    with BankClient(bank, static_addresses=addresses) as client:
        barrier.wait()  # every client imported and connected before any clock starts
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            r = client.fetch(path_refs(paths[i % len(paths)]), timeout_s=30)
            lat.append(time.perf_counter() - t)
            nbytes += r.nbytes
            errors += len(r.failed)
            i += 1
        active = time.perf_counter() - t0
    out.put({"latencies": lat, "nbytes": nbytes, "errors": errors, "active_s": active})


def concurrent_clients(bank_dir: Path, addresses: dict, n_clients: int, seconds: float) -> dict:
    """N client processes, each fetching random whole paths back to back for `seconds`."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(n_clients)
    workers = [ctx.Process(target=_client_worker, args=(str(bank_dir), addresses, seconds, 100 + k, barrier, q))
               for k in range(n_clients)]
    for w in workers:
        w.start()
    parts = [q.get(timeout=seconds + 300) for _ in workers]
    for w in workers:
        w.join(30)
    lat = [x for p in parts for x in p["latencies"]]
    total = sum(p["nbytes"] for p in parts)
    wall = max(p["active_s"] for p in parts)
    return {"clients": n_clients, "seconds": wall, "fetches": len(lat),
            "fetches_per_s": len(lat) / wall, "GB/s": total / wall / 1e9,
            "p50_ms": _pct([x * 1e3 for x in lat], 50), "p99_ms": _pct([x * 1e3 for x in lat], 99),
            "errors": sum(p["errors"] for p in parts)}


def main(argv: list[str] | None = None) -> int:
    from base.paths import home

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, default=home() / "banks" / "paper-smollm2")
    ap.add_argument("--paths", type=int, default=20, help="paths per single-client case")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--server-args", default="", help="extra serve-bank flags, e.g. '--hot-cache-bytes 0'")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from memory_store import Bank, path_refs
    from services.memory_bank.client import BankClient

    bank = Bank.open(args.bank)
    spec = bank.spec
    path_bytes = sum(spec.bytes_per_block(lv) for lv in range(1, spec.depth + 1))
    deep_bytes = path_bytes - spec.bytes_per_block(1)
    log.info("bank %s: %s, path %.1f MB (levels 2+3: %.1f MB)", bank.bank_id[:12], spec.dtype, path_bytes / 1e6,
             deep_bytes / 1e6)

    load_start = os.getloadavg()
    servers = start_shards(args.bank, bank.shard_ids, args.server_args.split())
    addresses = {sid: [p.address] for sid, p in zip(bank.shard_ids, servers, strict=True)}
    rows, figures = [], {"bank": str(args.bank), "bank_id": bank.bank_id, "spec": spec.model_dump(),
                         "path_bytes": path_bytes, "deep_bytes": deep_bytes}
    try:
        # Cases are interleaved round by round so that load from other processes hits them alike.
        sock = LoopbackSocket(path_bytes)
        floor = GrpcFloor()
        samples: dict[str, tuple[list[int], list[float], list[int]]] = {}

        def record(case: str, nbytes: int, seconds: float, errors: int = 0) -> None:
            b, s, e = samples.setdefault(case, ([], [], []))
            b.append(nbytes)
            s.append(seconds)
            e.append(errors)

        with BankClient(bank, static_addresses=addresses) as client:
            client.fetch(path_refs(_random_paths(bank, 1, 999)[0]))  # connect both channels
            for i, path in enumerate(_random_paths(bank, args.paths, seed=1)):
                whole = path_refs(path)
                deep = path_refs(_random_paths(bank, args.paths, seed=2)[i])[1:]
                for name, refs in (("whole path 1+2+3", whole), ("levels 2+3 (level 1 resident)", deep)):
                    drop_page_cache(args.bank)
                    (b,), (s,), e = _timed_fetches(client, [refs])
                    record(f"{name}, cold", b, s, e)
                    (b,), (s,), e = _timed_fetches(client, [refs])  # the same blocks again: page cache
                    record(f"{name}, warm", b, s, e)
                record("raw loopback TCP, path bytes", path_bytes, sock.transfer(path_bytes))
                record("raw loopback TCP, level 2+3 bytes", deep_bytes, sock.transfer(deep_bytes))
                record("grpc.aio floor (1 MiB messages, dropped), path bytes", path_bytes,
                       floor.transfer(path_bytes))
        sock.close()
        floor.close()
        mem_bw = memcpy_bandwidth(path_bytes)
        for case, (b, s, e) in samples.items():
            row = _summary(case, b, s)
            if not case.startswith("raw"):
                row["errors"] = sum(e)
            rows.append(row)
        rows.append({"case": "numpy memcpy, path bytes", "n": 5, "MB/fetch": path_bytes / 1e6,
                     "p50_ms": path_bytes / mem_bw * 1e3, "GB/s_p50": mem_bw / 1e9, "GB/s_mean": mem_bw / 1e9})
        figures["single_client"] = {k: {"nbytes": v[0], "seconds": v[1], "errors": sum(v[2])}
                                    for k, v in samples.items()}
        figures["memcpy_bytes_per_s"] = mem_bw

        conc = None
        if args.clients:
            drop_page_cache(args.bank)  # start cold: random paths fault their blocks in from disk
            conc = concurrent_clients(args.bank, addresses, args.clients, args.seconds)
        figures["concurrent"] = conc
    finally:
        for p in servers:
            p.terminate(20)

    # The machine is shared: the load average says how much other work ran beside the benchmark.
    figures["loadavg_1m"] = {"start": load_start[0], "end": os.getloadavg()[0], "cores": os.cpu_count()}
    by_case = {r["case"]: r for r in rows}
    cold_whole = by_case["whole path 1+2+3, cold"]
    warm_whole = by_case["whole path 1+2+3, warm"]
    deep_cold = by_case["levels 2+3 (level 1 resident), cold"]
    deep_warm = by_case["levels 2+3 (level 1 resident), warm"]
    targets = [
        target("whole path, cold: effective GB/s (p50)", cold_whole["GB/s_p50"], ">=", 0.8),
        target("whole path, warm: effective GB/s (p50)", warm_whole["GB/s_p50"], ">=", 0.8),
        target("level 1 resident, cold: p50 ms", deep_cold["p50_ms"], "<=", 15.0),
        target("level 1 resident, warm: p50 ms", deep_warm["p50_ms"], "<=", 15.0),
    ]
    if conc:
        targets.append(target(f"{conc['clients']} clients x {conc['seconds']:.0f}s: errors", conc["errors"], "<=", 0))
    sock_gbs = by_case["raw loopback TCP, path bytes"]["GB/s_p50"]
    floor_gbs = by_case["grpc.aio floor (1 MiB messages, dropped), path bytes"]["GB/s_p50"]
    figures["ratios"] = {"warm_whole_vs_raw_socket": warm_whole["GB/s_p50"] / sock_gbs,
                         "warm_whole_vs_grpc_floor": warm_whole["GB/s_p50"] / floor_gbs,
                         "warm_whole_vs_memcpy": warm_whole["GB/s_p50"] / (mem_bw / 1e9)}
    cols = ["case", "n", "MB/fetch", "p50_ms", "p99_ms", "mean_ms", "GB/s_p50", "GB/s_mean", "errors"]
    md = (f"Load average (1 min) at start / end: {figures['loadavg_1m']['start']:.1f} / "
          f"{figures['loadavg_1m']['end']:.1f} on {os.cpu_count()} cores (shared machine).\n\n")
    md += "## Single client\n\n" + markdown_table(rows, cols)
    md += (f"\nwarm whole path / raw loopback TCP = {figures['ratios']['warm_whole_vs_raw_socket']:.2f}; "
           f"/ grpc.aio floor = {figures['ratios']['warm_whole_vs_grpc_floor']:.2f}; "
           f"/ memcpy = {figures['ratios']['warm_whole_vs_memcpy']:.2f}\n")
    if conc:
        md += "\n## Concurrent clients (random whole paths, both shards)\n\n" + markdown_table([conc])
    out = write_results("fetch", figures, targets, md, results_dir=args.results_dir)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
