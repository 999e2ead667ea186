"""`hiermem up`: the whole stack on one machine as supervised child processes.

Starts redis-server when one is installed (static discovery otherwise), every shard of a bank directory
(with R replicas each) and the model server; waits until each is healthy; prints the URL and a curl
example; restarts a crashed child with exponential back-off (a shard comes back on its old port, so static
addresses stay valid); and on Ctrl-C / SIGTERM stops the model server, then the shards, then redis, each
by its process group, so no child outlives the launcher. The child-process machinery is
`hiermem.supervisor`; this module holds the settings, the plan of the stack and the commands.

Also registers two small commands the deployment files use: `hiermem probe` (gRPC health / HTTP readiness
probe for compose healthchecks) and `hiermem ensure-bank` (one-shot: build a bank when it is absent).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from base.entry import run
from base.paths import home
from base.settings_cli import add_settings_flags, settings_from_args
from hiermem.pki import TlsFiles, make_pki
from hiermem.supervisor import ChildSpec, Supervisor

log = logging.getLogger("hiermem.up")


# The preset `hiermem ensure-bank --source demo` (and so scripts/run.sh) builds: a fifth of the documents
# corpus, a user's corpus as written (paragraphs in several wordings, no route_text, no preserve file), with
# its nearest-document routing and calibrated gate, sized so the first run fits 15 minutes on every CPU seen
# (docs/training.md, "The demo bank"). The presets `docs` and `facts` stay for the long-tail benchmarks.
DEMO_PRESET = "demo"


def demo_bank() -> Path:
    """Where `hiermem build --preset demo` puts its bank: `$HIERMEM_HOME/banks/demo`."""
    return home() / "banks" / DEMO_PRESET


class UpSettings(BaseSettings):
    """Settings of `hiermem up`; every field is also a flag (`--replicas 2` = `HIERMEM_UP_REPLICAS=2`)."""

    model_config = SettingsConfigDict(env_prefix="HIERMEM_UP_", extra="ignore", use_attribute_docstrings=True)

    bank: Path = Field(default_factory=demo_bank)
    """Bank directory (manifest.json, tree.safetensors, shards/)."""
    shards: int | None = Field(None, ge=1)
    """Number of shards to serve; must equal the bank's shard count (default: the bank's)."""
    replicas: int = Field(1, ge=1, le=16)
    """Replicas started per shard."""
    anchor: str = "smollm2"
    """Anchor for the model server: smollm2, tiny, or a directory."""
    host: str = "127.0.0.1"
    """Interface every child binds."""
    port: int = Field(8000, ge=0, le=65535)
    """Model server HTTP port (0 = a free port)."""
    redis: Literal["auto", "on", "off"] = "auto"
    """Start redis-server for discovery: auto = when installed, on = required, off = static addresses."""
    redis_url: str | None = None
    """Use this running Redis instead of starting one."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """How long each stage may take to become healthy (the first SmolLM2 conversion takes a while)."""
    backoff_initial_s: float = Field(0.5, gt=0)
    """Delay before the first restart of a crashed child; doubles on each crash in a row."""
    backoff_max_s: float = Field(5.0, gt=0)
    """Longest delay between restarts."""
    backoff_reset_s: float = Field(10.0, gt=0)
    """A child healthy this long gets the initial delay again at its next crash."""
    stop_timeout_s: float = Field(20.0, gt=0)
    """Grace period after SIGTERM before children are killed."""
    liveness_interval_s: float = Field(10.0, ge=0)
    """Seconds between health probes of a running child (0 = only restart children that exit)."""
    liveness_failures: int = Field(3, ge=1)
    """Failed probes in a row after which a hung child is killed and restarted."""
    model_args: str = ""
    """Extra arguments for `hiermem serve-model` (shell syntax), e.g. "--api-keys-file keys.json"."""
    bank_args: str = ""
    """Extra arguments for every `hiermem serve-bank`."""
    tls: bool = False
    """Mutual TLS inside the stack: a throw-away CA, a server certificate for the shards and a client
    certificate for the model server, made with openssl in a private run directory (removed at exit)."""

    @model_validator(mode="after")
    def _check(self) -> UpSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        if self.redis == "off" and self.redis_url:
            raise ValueError("redis_url given but redis='off'")
        return self


# ---------------------------------------------------------------- probes


def probe_grpc(address: str, timeout: float = 2.0, tls: TlsFiles | None = None, *,
               ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None) -> bool:
    """True when the gRPC server at host:port answers grpc.health.v1 Check("") with SERVING: over TLS
    verified by `ca_file` (with a client certificate for mutual TLS), or with `tls`'s CA and client
    certificate."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is not None:
        ca_file, cert_file, key_file = tls.ca, tls.client_cert, tls.client_key
    if ca_file is not None:
        creds = grpc.ssl_channel_credentials(Path(ca_file).read_bytes(),
                                             Path(key_file).read_bytes() if key_file else None,
                                             Path(cert_file).read_bytes() if cert_file else None)
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def probe_http(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 200."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def probe_redis(url: str, timeout: float = 2.0) -> bool:
    """True when Redis at url answers PING."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except redis.RedisError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for redis-server, which cannot report a port it chose)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the stack


def _hiermem(*args: str) -> list[str]:
    return [sys.executable, "-m", "hiermem.cli", *args]


def bank_shard_ids(bank_dir: Path) -> list[str]:
    """Shard ids of a bank directory, through memory_store.Bank (reads manifest.json only)."""
    from memory_store import Bank, BankError

    try:
        return [str(s) for s in Bank.open(bank_dir).shard_ids]
    except BankError as exc:
        raise SystemExit(f"hiermem up: {exc}\n  make one with: hiermem ensure-bank --bank {bank_dir}") from None


def plan_stack(s: UpSettings, redis_url: str | None, tls: TlsFiles | None = None
               ) -> tuple[list[ChildSpec], Callable[[dict], ChildSpec]]:
    """The shard replica specs, and a factory for the model server spec given {shard: [addresses]}.

    The Redis URL (it may hold a password) reaches the children through their environment, not argv."""
    shard_ids = bank_shard_ids(s.bank)
    if s.shards is not None and s.shards != len(shard_ids):
        raise SystemExit(f"{s.bank} has {len(shard_ids)} shards, --shards asks for {s.shards}: reshard the "
                         f"bank first (see docs/operating.md)")
    bank_env = {"HIERMEM_BANK_REDIS_URL": redis_url} if redis_url else {}
    model_env = {"HIERMEM_MODEL_REDIS_URL": redis_url} if redis_url else {}
    shard_tls = tls.shard_args() if tls else []
    probe = (lambda addr: probe_grpc(addr, tls=tls)) if tls else probe_grpc
    shards = []
    for sid in shard_ids:
        for r in range(s.replicas):
            def argv(port: int, sid=sid, r=r) -> list[str]:
                # `python -m services.memory_bank` is serve-bank without the other packages' imports (torch)
                return [sys.executable, "-m", "services.memory_bank", "--bank", str(s.bank), "--shard", sid,
                        "--replica-id", f"r{r}", "--host", s.host, "--port", str(port), *shard_tls,
                        *shlex.split(s.bank_args)]
            shards.append(ChildSpec(f"shard-{sid}/r{r}", argv, probe, env=bank_env))

    def model(addresses: dict[str, list[str]]) -> ChildSpec:
        static = ",".join(f"{sid}={a}" for sid, addrs in addresses.items() for a in addrs)

        def argv(port: int) -> list[str]:
            return _hiermem("serve-model", "--anchor", s.anchor, "--bank", str(s.bank), "--host", s.host,
                            "--port", str(port), "--static-addresses", static, *(tls.model_args() if tls else []),
                            *shlex.split(s.model_args))

        # ready = anchor loaded and bank reachable; alive = /health, so a shard outage never restarts it,
        # with a generous timeout, since a busy 2-core machine can be slow to answer
        return ChildSpec("model", argv, lambda addr: probe_http(f"http://{addr}/ready"), port=s.port,
                         liveness=lambda addr: probe_http(f"http://{addr}/health", timeout=10.0), env=model_env)

    return shards, model


def curl_example(url: str, auth: bool = False) -> str:
    body = '{"prompt": "The capital of France is", "max_tokens": 16}'
    key = ' -H "Authorization: Bearer $HIERMEM_API_KEY"' if auth else ""
    return f"curl -s {url}/v1/completions -H 'Content-Type: application/json'{key} -d '{body}'"


def up(s: UpSettings, *, stop: threading.Event | None = None, out=None) -> int:
    """Run the stack until `stop` is set (or SIGINT/SIGTERM when run from the CLI); returns an exit code."""
    out = out or sys.stdout
    sup = Supervisor(backoff_initial_s=s.backoff_initial_s, backoff_max_s=s.backoff_max_s,
                     backoff_reset_s=s.backoff_reset_s, stop_timeout_s=s.stop_timeout_s,
                     liveness_interval_s=s.liveness_interval_s, liveness_failures=s.liveness_failures, stop=stop)
    redis_url = s.redis_url
    run_dir = Path(tempfile.mkdtemp(prefix="hiermem-up-"))  # private (0700): PKI, redis.conf
    try:
        tls = make_pki(run_dir / "tls", [s.host]) if s.tls else None
        if redis_url is None and s.redis != "off":
            if shutil.which("redis-server"):
                rport = free_port(s.host)
                # Redis asks for a password (in a 0600 config file, never on a command line): only the
                # stack's own processes, which get the URL in their environment, can register or list
                password = secrets.token_urlsafe(24)
                conf = run_dir / "redis.conf"
                conf.write_text(f"bind {s.host}\nport {rport}\nsave \"\"\nappendonly no\n"
                                f"requirepass {password}\n")
                os.chmod(conf, 0o600)
                redis_url = f"redis://:{password}@{s.host}:{rport}/0"
                own_url: str = redis_url

                def redis_probe(addr: str) -> bool:
                    return probe_redis(own_url)

                sup.start(ChildSpec("redis", lambda port: ["redis-server", str(conf)], redis_probe, port=rport))
                sup.wait_healthy(["redis"], s.startup_timeout_s)
            elif s.redis == "on":
                raise SystemExit("redis='on' but redis-server is not installed")
            else:
                log.info("redis-server not installed: the model server uses static shard addresses")
        shard_specs, model_spec = plan_stack(s, redis_url, tls)
        for spec in shard_specs:
            sup.start(spec)
        sup.wait_healthy([spec.name for spec in shard_specs], s.startup_timeout_s)
        addresses: dict[str, list[str]] = {}
        for spec in shard_specs:
            addresses.setdefault(spec.name.split("/")[0].removeprefix("shard-"), []).append(
                sup.address_of(spec.name))
        model = sup.start(model_spec(addresses))
        sup.wait_healthy(["model"], s.startup_timeout_s)
        url = f"http://{model.address}"
        shown = _hide_password(redis_url) if redis_url else None
        print(f"hiermem is up: {url}  ({len(addresses)} shard(s) x {s.replicas} replica(s), "
              f"discovery: {'redis ' + shown if shown else 'static'}, "
              f"bank traffic: {'mutual TLS' if s.tls else 'plaintext'})", file=out, flush=True)
        auth = "--api-keys-file" in s.model_args or bool(os.environ.get("HIERMEM_MODEL_API_KEYS_FILE"))
        print(f"try:  {curl_example(url, auth)}", file=out, flush=True)
        print("stop with Ctrl-C", file=out, flush=True)
        sup.run()
        return 0
    except InterruptedError:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        log.error("hiermem up failed: %s", exc)
        return 1
    finally:
        sup.stop_all(order=["model", *[n for n in sup.children if n.startswith("shard-")], "redis"])
        shutil.rmtree(run_dir, ignore_errors=True)


def _hide_password(url: str) -> str:
    head, at, tail = url.rpartition("@")
    return f"{head.split('//')[0]}//***@{tail}" if at else url


# ---------------------------------------------------------------- ensure-bank


def _ints(value: object) -> object:
    return [int(v) for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class EnsureBankSettings(BaseSettings):
    """Settings of `hiermem ensure-bank` (env prefix HIERMEM_INIT_): make sure a bank exists."""

    model_config = SettingsConfigDict(env_prefix="HIERMEM_INIT_", extra="ignore", use_attribute_docstrings=True)

    bank: Path = Field(default_factory=demo_bank)
    """Bank directory; nothing is done when its manifest.json exists (or it is a versioned root)."""
    source: Literal["synth", "demo"] = "synth"
    """synth = random-weight bank for the anchor (seconds); demo = `hiermem build --preset demo --no-eval
    --no-generic` (trains: minutes on 2 cores, docs/training.md "The demo bank")."""
    anchor: str = "smollm2"
    """Anchor the bank is built for (its identity, depth and width): smollm2, tiny or a directory."""
    shards: int = Field(2, ge=1)
    """Shards of a synthetic bank."""
    branching: Annotated[list[int], NoDecode] = [8, 8]
    """Children per level of a synthetic bank, e.g. 8,8."""
    ranks: Annotated[list[int], NoDecode] = [64, 16]
    """Memory units per level of a synthetic bank, e.g. 64,16."""
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = "float16"
    """Storage dtype of a synthetic bank (int8: rows quantized with their own scales)."""
    seed: int = 0
    """Seed of a synthetic bank."""

    @field_validator("branching", "ranks", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _ints(value)


def _set_aside_stale_demo(bank: Path) -> None:
    """The `demo` preset's name was the facts corpus's until issue 31 renamed it `facts`: an older home holds that
    build under work/demo and banks/demo. Both are renamed (never deleted), so the demo is built afresh."""
    try:
        from training.pipeline import stale_preset_work
    except ImportError:  # no training package: the demo cannot be built here anyway
        return
    work = home() / "work" / DEMO_PRESET
    why = stale_preset_work(DEMO_PRESET, work)
    if why is None:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (work, bank):
        if path.exists():
            aside = path.with_name(f"{path.name}.stale-{stamp}")
            path.rename(aside)
            log.warning("%s is not a build of the current demo preset (%s): moved to %s", path, why, aside)


def ensure_bank(s: EnsureBankSettings) -> Path:
    """Build the bank at `s.bank` unless one is there already; returns its directory."""
    from memory_store.bank import is_version_root

    if s.source == "demo" and s.bank == demo_bank():
        _set_aside_stale_demo(s.bank)
    if (s.bank / "manifest.json").is_file() or is_version_root(s.bank):
        log.info("bank present at %s: nothing to do", s.bank)
        return s.bank
    if s.bank.is_dir() and not any(s.bank.iterdir()):
        s.bank.rmdir()  # an empty directory (e.g. made by a volume mount) would block the atomic publish
    if s.source == "demo":
        # trains on the smollm2 anchor. Left out so that the first run of scripts/run.sh stays within 15
        # minutes: the evaluation (a later `hiermem build --preset demo` adds it, training and export kept) and
        # the generic memory, the evaluation's same-epochs control, trained in the same forward as the tree's
        # blocks (about a third of the training time). The tree's blocks get the same updates either way.
        argv = _hiermem("build", "--preset", DEMO_PRESET, "--out", str(s.bank), "--no-eval", "--no-generic")
        log.info("building the demo bank: %s", shlex.join(argv))
        subprocess.run(argv, check=True)
        return s.bank
    from lm import load_anchor
    from memory_store import AnchorIdentity, BankSpec
    from memory_store.synth import synth_bank

    anchor = load_anchor(s.anchor)
    cfg = anchor.config
    spec = BankSpec(branching=s.branching, ranks=s.ranks, memory_layers=list(range(cfg.n_layers)),
                    n_layers=cfg.n_layers, d_model=cfg.d_model, dtype=s.dtype)
    log.info("writing a synthetic bank for %s at %s: %.1fM params, %d shards", s.anchor, s.bank,
             spec.bank_params / 1e6, s.shards)
    synth_bank(s.bank, spec, s.shards, seed=s.seed, anchor=AnchorIdentity(**anchor.identity))
    return s.bank


# ---------------------------------------------------------------- CLI


def _cmd_up(args: argparse.Namespace) -> int:
    settings = settings_from_args(UpSettings, args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return up(settings, stop=stop)


def _cmd_ensure_bank(args: argparse.Namespace) -> int:
    print(ensure_bank(settings_from_args(EnsureBankSettings, args)))
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    if args.grpc:
        ok = probe_grpc(args.grpc, args.timeout, ca_file=args.tls_ca_file, cert_file=args.tls_cert_file,
                        key_file=args.tls_key_file)
    elif args.http:
        ok = probe_http(args.http, args.timeout)
    else:
        ok = probe_redis(args.redis, args.timeout)
    return 0 if ok else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("up", help="run redis, the bank shards and the model server, supervised",
                              description=__doc__.splitlines()[0])
    add_settings_flags(p, UpSettings)
    p.set_defaults(func=_cmd_up)

    p = subparsers.add_parser("ensure-bank", help="build a bank (synthetic or the demo) when it is absent")
    add_settings_flags(p, EnsureBankSettings)
    p.set_defaults(func=_cmd_ensure_bank)

    p = subparsers.add_parser("probe", help="health probe: exit 0 when the target is serving")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--grpc", metavar="HOST:PORT", help="grpc.health.v1 Check must answer SERVING")
    g.add_argument("--http", metavar="URL", help="GET must answer 200 (e.g. http://127.0.0.1:8000/ready)")
    g.add_argument("--redis", metavar="URL", help="PING must answer")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--tls-ca-file", type=Path, help="gRPC over TLS: verify the server by this CA")
    p.add_argument("--tls-cert-file", type=Path, help="gRPC mutual TLS: this client certificate ...")
    p.add_argument("--tls-key-file", type=Path, help="... and its key")
    p.set_defaults(func=_cmd_probe)


def main(argv: list[str] | None = None) -> int:
    """`python -m hiermem.launcher probe|up|ensure-bank ...`: these commands without importing the other
    packages' commands (torch), so a healthcheck answers in well under a second."""
    return run("python -m hiermem.launcher",
               lambda parser: register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True)),
               argv)


if __name__ == "__main__":
    sys.exit(main())
