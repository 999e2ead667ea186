"""Faults under a steady bounded load: `python -m bench.faults` -> bench/results/faults.{json,md}.

The stack is `hiermem up` (2 shards x 2 replicas, tiny anchor, a small synthetic bank in a versioned root,
hash-trigram routing, the model server with `--cache-bytes 0` so every level-2 block is fetched) plus a
second model server in `--strict` mode, and a redis-server this script owns (so it can stop it). Four
clients (two per model server) send short completions (4 tokens) back to back, alternating an explicit
path (whose greedy answer under each bank version is known) and a routed prompt, on loopback only.

Scenarios, each at least `--seconds` (60) under that load:

* kill9       kill -9 of replica r0 of shard 0, later of shard 1 (the supervisor restarts them)
* redis       redis-server stopped for 30 s, then started again (empty)
* rollout     a retrained version published to the root (`current` re-pointed), replicas r1 drained and
              restarted onto it, the model servers follow, then replicas r0 one by one
* rogue       registry records under the served bank's prefix: a replica of another bank, a dead address
* corrupt     one level-2 block's bytes flipped on disk (every replica shares the file)
* deleted     a version with a level-1 and a level-2 subtree deleted, rolled out as above; requests keep
              going to paths and prompts inside the deleted subtrees

Counted per scenario: requests, non-200 answers, degraded answers, and mixed-version answers (an
explicit-path answer that is neither version's; the check is meaningful because the versions answer
every probe path differently, which the run verifies). For `corrupt`: answers for the corrupt path that
used its level 2 (must be 0) and that were flagged (degraded, or 503 in strict mode).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import markdown_table, target, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration import procs  # noqa: E402  (process helpers shared with the integration tests)

PROMPTS = ["The capital of France is", "Water boils at", "Photosynthesis converts light", "Once upon a time",
           "Prime numbers are", "The river Nile flows", "Mount Everest is", "The speed of light",
           "Gold has the atomic number", "Shakespeare wrote", "The Pacific Ocean", "A haiku about rain"]
# explicit probe paths: one per level-2 child 0 and 1 of every level-1 node (2:1 and 1:3 get deleted)
PATHS = [(i, i * 4 + k) for i in range(4) for k in (0, 1)]
DELETE = [(1, 3), (2, 1)]
CORRUPT_PATH = (2, 8)


@dataclass
class Record:
    t: float
    server: str
    path: tuple[int, ...] | None
    status: int
    degraded: bool = False
    levels: tuple[int, ...] = ()
    text: str | None = None
    error: str = ""
    routed: tuple[int, ...] = ()  # the path the server used (a routed prompt's route)


@dataclass
class Stack:
    work: Path
    root: Path
    redis: procs.RedisServer
    launcher: subprocess.Popen
    strict: procs.ManagedProcess
    urls: dict[str, str]
    err: list[str] = field(default_factory=list)

    def replica_pid(self, shard: str, replica: str) -> int:
        for p in psutil.Process(self.launcher.pid).children(recursive=True):
            cmd = p.cmdline()
            if "services.memory_bank" in cmd and cmd[cmd.index("--shard") + 1] == shard \
                    and cmd[cmd.index("--replica-id") + 1] == replica:
                return p.pid
        raise RuntimeError(f"no replica {shard}/{replica}")

    def wait_log(self, pattern: str, after: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in self.err[after:]):
                return
            time.sleep(0.1)
        raise TimeoutError(f"no {pattern!r} in the launcher's log after {timeout} s")

    def bank_ids(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name, url in self.urls.items():
            try:
                out[name] = httpx.get(f"{url}/ready", timeout=5).json().get("bank_id")
            except (httpx.HTTPError, ValueError):
                out[name] = None
        return out


def build_banks(work: Path) -> dict[str, Path]:
    """v1 and v2 (a 'retrained' bank: other weights, same tree), for the tiny anchor."""
    import numpy as np

    from lm import load_anchor
    from memory_store import AnchorIdentity, BankSpec, BankWriter, NodeRef
    from memory_store.tree import random_tree

    anchor = load_anchor("tiny")
    c = anchor.config
    spec = BankSpec(branching=[4, 4], ranks=[8, 4], memory_layers=list(range(c.n_layers)), n_layers=c.n_layers,
                    d_model=c.d_model, dtype="float16", embedder_name="hash-trigram", embedder_dim=384)
    tree = random_tree([4, 4], 384, seed=0)
    out = {}
    for name, seed in (("v1", 1), ("v2", 2)):
        rng = np.random.default_rng(seed)
        with BankWriter(work / name, spec, AnchorIdentity(**anchor.identity), tree, 2) as w:
            for level in (1, 2):
                for i in range(spec.nodes_at(level)):
                    w.write_block(NodeRef(level, i), 0.5 * rng.standard_normal(spec.block_shape(level)))
            w.write_generic(0.1 * rng.standard_normal(spec.generic_shape))
        out[name] = work / name
    return out


def start_stack(work: Path, banks: dict[str, Path]) -> Stack:
    from memory_store.ops import init_version_root

    root = work / "root"
    init_version_root(banks["v1"], root)
    redis = procs.start_redis()
    model_args = "--cache-bytes 0 --pinned-levels 1 --torch-threads 1 --bank-follow-s 1 --max-batch 8"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hiermem.cli", "up", "--bank", str(root), "--anchor", "tiny", "--port", "0",
         "--replicas", "2", "--redis-url", redis.url, "--liveness-interval-s", "2", f"--model-args={model_args}",
         "--bank-args=--heartbeat-s 1 --registry-ttl-s 4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT)
    out: list[str] = []
    err: list[str] = []
    for stream, sink in ((launcher.stdout, out), (launcher.stderr, err)):
        threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    url = None
    while url is None and time.monotonic() < deadline:
        url = next((m.group(1) for line in out if (m := re.search(r"hiermem is up: (http://\S+)", line))), None)
        if launcher.poll() is not None:
            raise RuntimeError("hiermem up exited:\n" + "".join(err[-40:]))
        time.sleep(0.2)
    if url is None:
        raise RuntimeError("hiermem up did not come up:\n" + "".join(err[-40:]))
    strict = procs.ManagedProcess(
        [sys.executable, "-m", "services.model_server", "--anchor", "tiny", "--bank", str(root), "--redis-url",
         redis.url, "--port", "0", "--strict", *model_args.split()], "strict")
    strict.wait_listening(300)
    return Stack(work, root, redis, launcher, strict, {"plain": url, "strict": f"http://{strict.address}"}, err)


class Load:
    """`clients` threads (half per model server) sending 4-token completions back to back."""

    def __init__(self, stack: Stack, clients: int, max_tokens: int) -> None:
        self.stack, self.max_tokens = stack, max_tokens
        self.records: list[Record] = []
        self._stop = threading.Event()
        servers = list(stack.urls)
        self._threads = [threading.Thread(target=self._run, args=(servers[i % len(servers)], i), daemon=True)
                         for i in range(clients)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Record]:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        return self.records

    def _run(self, server: str, seed: int) -> None:
        rng = random.Random(seed)
        url = self.stack.urls[server]
        n = 0
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                path = rng.choice(PATHS) if n % 2 == 0 else None
                n += 1
                self.records.append(ask(client, url, server, path, rng.choice(PROMPTS), self.max_tokens))


def ask(client: httpx.Client, url: str, server: str, path: tuple[int, ...] | None, prompt: str,
        max_tokens: int) -> Record:
    body = {"prompt": "Tell me" if path else prompt, "max_tokens": max_tokens, "temperature": 0,
            "memory": list(path) if path else "auto"}
    t = time.monotonic()
    try:
        r = client.post(f"{url}/v1/completions", json=body)
    except httpx.HTTPError as exc:
        return Record(t, server, path, 0, error=f"{type(exc).__name__}: {exc}")
    if r.status_code != 200:
        return Record(t, server, path, r.status_code, error=r.text[:200])
    doc = r.json()
    mem = doc.get("memory") or {}
    return Record(t, server, path, 200, bool(mem.get("degraded")), tuple(mem.get("levels") or ()),
                  doc["choices"][0]["text"], routed=tuple(mem.get("path") or ()))


def answers(stack: Stack, max_tokens: int) -> dict[tuple[int, ...], str]:
    """The greedy answer of every probe path under the version both model servers serve now."""
    with httpx.Client(timeout=60) as client:
        out = {}
        for p in PATHS:
            got = {ask(client, url, name, p, "", max_tokens).text for name, url in stack.urls.items()}
            if len(got) != 1 or None in got:
                raise RuntimeError(f"path {p}: the model servers disagree or fail: {got}")
            out[p] = got.pop()
        return out


def roll(stack: Stack, new_id: str, log: Callable[[str], None]) -> None:
    """Drain and restart r1 of every shard (onto `current`), wait for the model servers to follow, then r0."""
    for replica in ("r1", "r0"):
        for shard in ("0", "1"):
            mark = len(stack.err)
            psutil.Process(stack.replica_pid(shard, replica)).send_signal(signal.SIGTERM)
            stack.wait_log(rf"shard-{shard}/{replica} healthy again", mark)
            log(f"shard {shard}/{replica} restarted onto the new version")
        if replica == "r1":
            deadline = time.monotonic() + 60
            while set(stack.bank_ids().values()) != {new_id}:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"model servers did not follow: {stack.bank_ids()}")
                time.sleep(0.2)
            log("both model servers serve the new version")


def summarize(name: str, records: list[Record], allowed: dict[tuple[int, ...], set[str]],
              skip: Callable[[Record], bool] = lambda r: False) -> dict[str, Any]:
    considered = [r for r in records if not skip(r)]
    mixed = [r for r in considered if r.status == 200 and not r.degraded and r.path is not None
             and r.text not in allowed.get(r.path, set())]
    return {"scenario": name, "requests": len(considered), "non_200": sum(r.status != 200 for r in considered),
            "degraded": sum(r.degraded for r in considered), "mixed_version": len(mixed),
            "strict_requests": sum(r.server == "strict" for r in considered),
            "errors": sorted({r.error[:120] for r in considered if r.status != 200})[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each scenario under load")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--scenarios", default="kill9,redis,rollout,rogue,corrupt,deleted")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--rescore", metavar="JSON", help="only rebuild the report from a results file")
    args = ap.parse_args()
    if args.rescore:
        return 0 if rescore(Path(args.rescore)) else 1
    wanted = args.scenarios.split(",")
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[faults {time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="hiermem-faults-"))
    banks = build_banks(work)
    stack = start_stack(work, banks)
    log(f"stack up: {stack.urls}")
    from memory_store import Bank, NodeRef
    from memory_store.ops import add_version, delete_subtrees
    from services.memory_bank.registry import replica_key

    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    versions = {"v1": answers(stack, args.max_tokens)}
    current = "v1"
    try:
        for name in wanted:
            load = Load(stack, args.clients, args.max_tokens).start()
            t0 = time.monotonic()
            allowed_versions = [current]
            skip: Callable[[Record], bool] = lambda r: False  # noqa: E731
            if name == "kill9":
                for shard, at in (("0", 5), ("1", 5 + args.seconds / 2)):
                    time.sleep(max(0.0, t0 + at - time.monotonic()))
                    psutil.Process(stack.replica_pid(shard, "r0")).kill()
                    log(f"kill -9 shard {shard}/r0")
            elif name == "redis":
                time.sleep(10)
                stack.redis.stop()
                log("redis stopped")
                time.sleep(30)
                stack.redis.start()
                log("redis started again")
            elif name in ("rollout", "deleted"):
                time.sleep(3)
                before = Bank.open(stack.root).bank_id
                if name == "rollout":
                    add_version(banks["v2"], stack.root)
                else:
                    delete_subtrees(stack.root, [NodeRef(*r) for r in DELETE])
                new_id = Bank.open(stack.root).bank_id
                log(f"{name}: current {before[:12]} -> {new_id[:12]}")
                roll(stack, new_id, log)
                extra[f"{name}_rolled_after_s"] = round(time.monotonic() - t0, 1)
            elif name == "rogue":
                foreign = procs.start_bank_shard(banks["v1"], "0", replica_id="foreign")
                bank_id = Bank.open(stack.root).bank_id
                r = __import__("redis").Redis.from_url(stack.redis.url)
                time.sleep(5)
                for rid, addr in (("rogue", foreign.address), ("dead", f"127.0.0.1:{procs.free_port()}")):
                    r.set(replica_key(bank_id, "0", rid), json.dumps(
                        {"shard_id": "0", "replica_id": rid, "address": addr, "owned": [[1, 0], [1, 1]],
                         "bank_id": bank_id}), ex=int(args.seconds) + 30)
                log("rogue registry entries written")
            elif name == "corrupt":
                time.sleep(5)
                vdir = Bank.open(stack.root).dir
                procs.corrupt_block(vdir, "1", 2, CORRUPT_PATH[1], byte=100)
                t_bad = time.monotonic()
                log(f"flipped a byte of block 2:{CORRUPT_PATH[1]} in {vdir.name}")
            time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
            if name == "corrupt":
                t_good = time.monotonic()
                procs.corrupt_block(vdir, "1", 2, CORRUPT_PATH[1], byte=100)  # flip back
            records = load.stop()
            duration = time.monotonic() - t0
            if name == "rogue":
                for rid in ("rogue", "dead"):
                    r.delete(replica_key(bank_id, "0", rid))
                foreign.terminate()
            if name in ("rollout", "deleted"):
                current = "v2" if name == "rollout" else "v3"
                versions[current] = answers(stack, args.max_tokens)
                allowed_versions.append(current)
                differ = sum(versions[allowed_versions[0]][p] != versions[current][p] for p in PATHS)
                extra[f"{name}_probe_paths_answered_differently"] = f"{differ} of {len(PATHS)}"
            allowed = {p: {versions[v][p] for v in allowed_versions} for p in PATHS}
            if name == "corrupt":
                window = (t_bad - 2.0, t_good + 2.0)  # requests in flight when the byte flipped either way

                def hit(r: Record, window=window) -> bool:
                    # a request for the corrupt node (explicit, or routed there), or one refused for it:
                    # the only memory failure of this scenario is that block's
                    return window[0] <= r.t < window[1] and (
                        r.path == CORRUPT_PATH or r.routed[:2] == CORRUPT_PATH
                        or (r.status == 503 and "memory_unavailable" in r.error))

                bad = [r for r in records if hit(r)]
                extra["corrupt_path_requests"] = len(bad)
                extra["corrupt_block_injected"] = sum(r.status == 200 and 2 in r.levels for r in bad
                                                      if t_bad < r.t < t_good)
                extra["corrupt_path_flagged"] = sum(r.degraded or r.status == 503 for r in bad)
                extra["corrupt_path_flagged_while_corrupt"] = sum(
                    r.degraded or r.status == 503 for r in bad if t_bad + 0.5 < r.t < t_good)
                extra["corrupt_path_requests_while_corrupt"] = sum(1 for r in bad if t_bad + 0.5 < r.t < t_good)
                skip = hit
            row = summarize(name, records, allowed, skip)
            row["seconds"] = round(duration, 1)
            if name == "deleted":
                gone = [r for r in records if r.path is not None and any(r.path[lv - 1] == i for lv, i in DELETE)
                        and r.t > t0 + extra["deleted_rolled_after_s"]]
                extra["deleted_path_requests"] = len(gone)
                extra["deleted_path_strict_200"] = sum(r.status == 200 for r in gone if r.server == "strict")
                extra["deleted_path_strict_requests"] = sum(r.server == "strict" for r in gone)
            rows.append(row)
            log(f"{name}: {row}")
    except BaseException:
        print("".join(stack.err[-60:]), file=sys.stderr)
        print(stack.strict.output(60), file=sys.stderr)
        raise
    finally:
        try:
            metrics = {n: httpx.get(f"{u}/metrics", timeout=10).text for n, u in stack.urls.items()}
            for n, text in metrics.items():
                m = re.search(r"^hiermem_bank_replicas_rejected_total (\S+)$", text, re.M)
                extra[f"{n}_replicas_rejected_total"] = float(m.group(1)) if m else None
                m = re.search(r"^hiermem_degraded_requests_total (\S+)$", text, re.M)
                extra[f"{n}_degraded_requests_total"] = float(m.group(1)) if m else None
        except httpx.HTTPError:
            pass
        stack.strict.terminate()
        stack.launcher.send_signal(signal.SIGTERM)
        try:
            stack.launcher.wait(120)
        except subprocess.TimeoutExpired:
            stack.launcher.kill()
        stack.redis.stop()
    figures = {"scenarios": rows, "extra": extra, "clients": args.clients, "max_tokens": args.max_tokens,
               "seconds_per_scenario": args.seconds, "total_s": round(time.monotonic() - t_start, 1)}
    ok = report(figures, Path(args.out) if args.out else None)
    log(f"done in {time.monotonic() - t_start:.0f} s: bench/results/faults.md")
    return 0 if ok else 1


def report(figures: dict[str, Any], out: Path | None = None, command: str | None = None) -> bool:
    """Targets and tables from the figures; writes faults.{json,md}; returns whether every target is met."""
    rows, extra = figures["scenarios"], figures["extra"]
    targets = []
    for r in rows:
        bad = r["non_200"] + r["mixed_version"] + (0 if r["scenario"] == "corrupt" else r["degraded"])
        what = "failed or mixed-version" if r["scenario"] == "corrupt" else "failed, degraded or mixed-version"
        targets.append(target(f"{r['scenario']}: {what} answers", bad, "<=", 0))
    if "corrupt_block_injected" in extra:
        targets.append(target("corrupt: corrupt block injected", extra["corrupt_block_injected"], "<=", 0))
        flagged = (extra["corrupt_path_flagged_while_corrupt"]
                   / max(1, extra["corrupt_path_requests_while_corrupt"]))
        targets.append(target("corrupt: corrupt-path answers flagged (fraction)", flagged, ">=", 1.0))
    if "deleted_path_strict_requests" in extra:
        frac = extra["deleted_path_strict_200"] / max(1, extra["deleted_path_strict_requests"])
        targets.append(target("deleted: strict-mode 200 for deleted paths (fraction)", frac, ">=", 1.0))
    cols = ["scenario", "seconds", "requests", "strict_requests", "non_200", "degraded", "mixed_version"]
    tables = (f"{figures['clients']} clients (half per model server: plain and `--strict`), "
              f"{figures['max_tokens']}-token completions back to back, loopback; `hiermem up` with 2 shards x 2 "
              "replicas, tiny anchor, synthetic bank (4 x 16 nodes, hash-trigram routing), versioned root. "
              "`corrupt` counts exclude the requests for the corrupt node while it was corrupt (they are in the "
              f"extra figures). Whole run {figures['total_s']} s.\n\n"
              + markdown_table(rows, cols) + "\n"
              + markdown_table([{"figure": k, "value": v} for k, v in extra.items()]))
    write_results("faults", figures, targets, tables, command=command, results_dir=out)
    return all(t["met"] for t in targets)


def rescore(path: Path) -> bool:
    """Rewrite faults.{json,md} from a previous run's figures (same measurements, current targets)."""
    doc = json.loads(path.read_text())
    return report(doc["figures"], path.parent, command=doc["command"])


if __name__ == "__main__":
    sys.exit(main())
