"""Helpers for tests that start real processes: free ports, redis-server, bank shard replicas, health.

Shared by every integration test (bank service, model server). Processes are started in their own process
group, their stderr+stdout is drained by a thread into `proc.lines` (so pipes never fill), and the
`LISTENING host:port` line they log (docs/design.md §2) tells the chosen port.

    redis = start_redis()                                   # real redis-server on a free port
    shard = start_bank_shard(bank_dir, "0", redis_url=redis.url, replica_id="a")
    assert wait_for_health(shard.address)
    shard.kill9()                                           # or shard.terminate() for SIGTERM + wait
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING_RE = re.compile(r"LISTENING (\S+:\d+)")
METRICS_RE = re.compile(r"METRICS (\S+:\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (prefer binding port 0 in the process itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


class ManagedProcess:
    """A child process with its output captured line by line.

    Attributes:
        popen: the subprocess.Popen.
        lines: every output line so far (stderr and stdout merged).
        address: "host:port" from its LISTENING line (after `wait_listening`).
        metrics_address: "host:port" from its METRICS line, if it logged one.
    """

    def __init__(self, cmd: Sequence[str], name: str, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.cmd = list(cmd)
        self.name = name
        self.lines: collections.deque[str] = collections.deque(maxlen=5000)
        self.address: str | None = None
        self.metrics_address: str | None = None
        self._listening = threading.Event()
        self.popen = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            cwd=str(cwd or REPO_ROOT), env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._drain, name=f"drain {name}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.metrics_address is None and (m := METRICS_RE.search(line)):
                self.metrics_address = m.group(1)
            if not self._listening.is_set() and (m := LISTENING_RE.search(line)):
                self.address = m.group(1)
                self._listening.set()
        self._listening.set()  # EOF: wake waiters; `address` stays None if it never listened

    def wait_listening(self, timeout: float = 60.0) -> str:
        """Waits for the LISTENING line; returns the address. Raises with the output if it never comes."""
        if not self._listening.wait(timeout) or self.address is None:
            self.kill9()
            raise RuntimeError(f"{self.name} did not report LISTENING within {timeout}s "
                               f"(exit {self.popen.poll()}):\n{self.output()}")
        return self.address

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, last: int = 60) -> str:
        return "\n".join(list(self.lines)[-last:])

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then waits (SIGKILL of the group after `timeout`). Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return self.popen.wait(5)

    def kill9(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, address={self.address})"


def start_process(cmd: Sequence[str], name: str, *, env: dict[str, str] | None = None,
                  wait_listening: bool = True, timeout: float = 60.0) -> ManagedProcess:
    """Starts `cmd` and (by default) waits for its LISTENING line."""
    proc = ManagedProcess(cmd, name, env=env)
    if wait_listening:
        proc.wait_listening(timeout)
    return proc


class RedisServer:
    """A throw-away redis-server (no persistence) on a fixed port, restartable on the same port."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        if not redis_available():
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.host = host
        self.port = port or free_port(host)
        self.url = f"redis://{host}:{self.port}/0"
        self.proc: ManagedProcess | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        cmd = ["redis-server", "--bind", self.host, "--port", str(self.port), "--save", "",
               "--appendonly", "no", "--protected-mode", "no"]
        self.proc = ManagedProcess(cmd, f"redis:{self.port}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if not self.proc.alive():
                break
            time.sleep(0.05)
        out = self.proc.output()
        self.proc.kill9()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{out}")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate(10)
            self.proc = None

    def restart(self) -> RedisServer:
        """Stops and starts again on the same port (empty: no persistence)."""
        self.stop()
        return self.start()


def start_redis(port: int | None = None) -> RedisServer:
    """A started RedisServer on a free port (or `port`)."""
    return RedisServer(port).start()


def bank_shard_cmd(bank_dir: str | Path, shard: str, *, redis_url: str | None = None,
                   replica_id: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "services.memory_bank", "--bank", str(bank_dir), "--shard", str(shard),
           "--host", "127.0.0.1", "--port", "0"]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    if replica_id:
        cmd += ["--replica-id", replica_id]
    return cmd + list(extra_args)


def start_bank_shard(bank_dir: str | Path, shard: str, *, redis_url: str | None = None,
                     replica_id: str | None = None, extra_args: Sequence[str] = (),
                     env: dict[str, str] | None = None, timeout: float = 60.0) -> ManagedProcess:
    """Starts `hiermem serve-bank` for one shard replica on a free port; returns once it listens."""
    cmd = bank_shard_cmd(bank_dir, shard, redis_url=redis_url, replica_id=replica_id, extra_args=extra_args)
    return start_process(cmd, f"shard {shard}/{replica_id or '?'}", env=env, timeout=timeout)


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...), or the gRPC error code name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_for_health(address: str, service: str = "", want: str = "SERVING", timeout: float = 20.0) -> bool:
    """Polls the health service until it reports `want`; returns whether it did within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(address, service, timeout=1.0) == want:
            return True
        time.sleep(0.05)
    return False


def build_test_bank(bank_dir: str | Path, *, n_shards: int = 2, branching: Sequence[int] = (4, 4, 4),
                    ranks: Sequence[int] = (8, 4, 2), d_model: int = 128, dtype: str = "float16",
                    seed: int = 0, absent: Sequence[tuple[int, int]] = ()) -> Path:
    """A tiny synthetic bank (random tree and blocks) for process tests; built in well under a second.
    Nodes listed in `absent` are left out (recorded as deleted: readers raise NodeNotFound)."""
    import numpy as np

    from memory_store import AnchorIdentity, BankSpec, BankWriter, NodeRef
    from memory_store.tree import random_tree

    spec = BankSpec(branching=list(branching), ranks=list(ranks), memory_layers=[0, 1], n_layers=2,
                    d_model=d_model, dtype=dtype, embedder_dim=16)
    tree = random_tree(list(branching), 16, seed=seed)
    rng = np.random.default_rng(seed)
    skip = {tuple(r) for r in absent}
    with BankWriter(bank_dir, spec, AnchorIdentity(arch="tiny-test", hash="0" * 16), tree, n_shards,
                    allow_missing=bool(skip)) as w:
        for level in range(1, spec.depth + 1):
            for i in range(spec.nodes_at(level)):
                if (level, i) in skip:
                    continue
                w.write_block(NodeRef(level, i), rng.standard_normal(spec.block_shape(level), dtype=np.float32))
    return Path(bank_dir)


def corrupt_block(bank_dir: str | Path, shard: str, level: int, index: int, byte: int = 0) -> None:
    """Flips one byte of a stored block in place (the manifest keeps the old crc32c): a bit-rot replica."""
    from memory_store.fileformat import MappedFile

    path = Path(bank_dir) / "shards" / shard / f"level-{level}.safetensors"
    mapped = MappedFile(path)
    start = mapped.data_start + mapped.entries[f"n{index}"]["data_offsets"][0] + byte
    mapped.close()
    with open(path, "r+b") as f:
        f.seek(start)
        old = f.read(1)
        f.seek(start)
        f.write(bytes([old[0] ^ 0xFF]))
