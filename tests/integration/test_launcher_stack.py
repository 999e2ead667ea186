"""`hiermem up` end to end: redis-server (when installed), two real bank shards and the real model server
with the tiny anchor and a synthetic bank built for it; a completion, a shard killed and back within 10 s,
and SIGTERM leaving no process behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from hiermem.launcher import EnsureBankSettings, ensure_bank, probe_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("up") / "bank"
    return ensure_bank(EnsureBankSettings(bank=out, anchor="tiny", shards=2, branching=[2, 2], ranks=[4, 2],
                                          dtype="float32"))


class Launcher:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "hiermem.cli", "up", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()

    def wait_for(self, pattern: str, lines: list[str], timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "launcher exited:\n" + "".join(self.err[-50:])
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} after {timeout} s:\n" + "".join(self.err[-50:]))

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _complete(url: str, prompt: str) -> dict:
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_up_serves_restarts_a_killed_shard_and_stops_clean(bank):
    launcher = Launcher("--bank", str(bank), "--anchor", "tiny", "--port", "0", "--backoff-initial-s", "0.5")
    try:
        url = launcher.wait_for(r"hiermem is up: (http://\S+)", launcher.out, timeout=240).group(1)
        assert any("curl" in line and url in line for line in launcher.out)
        answer = _complete(url, "The capital of France is")
        assert answer["choices"][0]["text"]
        assert len(answer["memory"]["path"]) == 2 and answer["memory"]["degraded"] is False

        children = launcher.descendants()
        shard0 = [p for p in children if "--shard" in p.cmdline() and p.cmdline()[p.cmdline().index("--shard") + 1] == "0"]
        assert len(shard0) == 1
        address = launcher.wait_for(r"shard-0/r0 healthy at (\S+)", launcher.err, timeout=5).group(1)
        assert probe_grpc(address)

        shard0[0].kill()
        t0 = time.monotonic()
        launcher.wait_for(r"shard-0/r0 healthy again at " + re.escape(address), launcher.err, timeout=10)
        assert probe_grpc(address)
        restarted_in = time.monotonic() - t0
        assert restarted_in < 10, restarted_in
        assert [p for p in launcher.descendants() if p.pid not in {c.pid for c in children}], "no new process"
        assert _complete(url, "Paris is a city in")["memory"]["degraded"] is False

        everyone = launcher.descendants()
        assert len(everyone) >= 3
        model_port = int(url.rsplit(":", 1)[1])
    finally:
        launcher.proc.send_signal(signal.SIGTERM)
        code = launcher.proc.wait(timeout=90)
    assert code == 0, "".join(launcher.err[-30:])
    assert not [p for p in everyone if _alive(p)], "children outlived the launcher"
    assert not probe_grpc(address, 0.5)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", model_port)) != 0, "model server port still open"
    assert any("stopped model" in line for line in launcher.err)


def test_up_refuses_a_shard_count_the_bank_does_not_have(bank):
    out = subprocess.run([sys.executable, "-m", "hiermem.cli", "up", "--bank", str(bank), "--shards", "3",
                          "--redis", "off"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HIERMEM_UP_ANCHOR": "tiny"})
    assert out.returncode != 0
    assert "has 2 shards" in out.stderr and "reshard" in out.stderr


def test_up_without_redis_serves_replicas_from_static_addresses(bank):
    launcher = Launcher("--bank", str(bank), "--anchor", "tiny", "--port", "0", "--redis", "off",
                        "--replicas", "2")
    try:
        m = launcher.wait_for(r"hiermem is up: (http://\S+)\s+\((\d+) shard\(s\) x (\d+) replica\(s\), "
                              r"discovery: (\w+)", launcher.out, timeout=240)
        url = m.group(1)
        assert m.group(2, 3, 4) == ("2", "2", "static")
        cmdlines = [p.cmdline() for p in launcher.descendants()]
        assert not [c for c in cmdlines if "redis-server" in c[0]]
        model = next(c for c in cmdlines if "serve-model" in c)
        static = model[model.index("--static-addresses") + 1].split(",")
        assert sorted(a.split("=")[0] for a in static) == ["0", "0", "1", "1"]
        assert _complete(url, "The capital of France is")["memory"]["degraded"] is False
        everyone = launcher.descendants()
    finally:
        launcher.proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = launcher.proc.wait(timeout=90)
    assert code == 0
    assert not [p for p in everyone if _alive(p)]


def test_up_without_a_bank_says_how_to_make_one(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hiermem.cli", "up", "--bank", str(tmp_path / "none"),
                          "--redis", "off"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "is not a bank" in out.stderr and "hiermem ensure-bank --bank" in out.stderr
    assert "Traceback" not in out.stderr


def test_up_tls_serves_over_mutual_tls_and_a_draining_model_server_finishes_its_stream(bank):
    """Issue 12, findings 10 and 5 live: `hiermem up --tls` runs the shards with mutual TLS (plaintext and
    certificate-less callers refused) and Redis with a password; SIGTERM to the model server lets a
    400-token stream finish although /health is gone meanwhile and the liveness probe runs every 0.3 s."""
    import redis as redis_py

    launcher = Launcher("--bank", str(bank), "--anchor", "tiny", "--port", "0", "--tls",
                        "--liveness-interval-s", "0.3", "--liveness-failures", "1", "--model-args=--torch-threads 1")
    try:
        m = launcher.wait_for(r"hiermem is up: (http://\S+) .*discovery: redis (\S+), bank traffic: mutual TLS",
                              launcher.out, timeout=240)
        url, shown_redis = m.group(1), m.group(2)
        assert "***@" in shown_redis  # the password is not printed
        answer = _complete(url, "The capital of France is")
        assert answer["memory"]["levels"] == [1, 2] and answer["memory"]["degraded"] is False
        address = launcher.wait_for(r"shard-0/r0 healthy at (\S+)", launcher.err, timeout=5).group(1)
        assert not probe_grpc(address, 1.0)  # plaintext
        shard_cmd = next(p.cmdline() for p in launcher.descendants() if "--tls-client-ca-file" in p.cmdline())
        pki = Path(shard_cmd[shard_cmd.index("--tls-client-ca-file") + 1]).parent
        tls_flags = ["--tls-ca-file", str(pki / "ca.pem"), "--tls-cert-file", str(pki / "client.pem"),
                     "--tls-key-file", str(pki / "client.key")]
        probe = [sys.executable, "-m", "hiermem.launcher", "probe", "--grpc", address, "--timeout", "2"]
        assert subprocess.run([*probe, *tls_flags], capture_output=True, timeout=60).returncode == 0
        assert subprocess.run([*probe, *tls_flags[:2]], capture_output=True, timeout=60).returncode == 1
        cmdlines = [" ".join(p.cmdline()) for p in launcher.descendants()]
        assert all("requirepass" not in c and "redis://" not in c for c in cmdlines)
        rport = int(shown_redis.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_py.Redis(port=rport, socket_timeout=2).ping()

        model = next(p for p in launcher.descendants() if "serve-model" in p.cmdline())
        tokens: list[str] = []

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        tokens.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 60
        while len(tokens) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        model.terminate()  # SIGTERM, as an operator rolling it would
        reader.join(120)
        # the stream ran to its end (chunks of tokens that decode to no text yet are merged into later ones)
        assert tokens and '"finish_reason":"length"' in tokens[-1], f"stream cut after {len(tokens)} chunks"
        assert len(tokens) > 300
        launcher.wait_for(r"model \(pid \d+\) drained and exited", launcher.err, timeout=60)
        launcher.wait_for(r"model healthy again", launcher.err, timeout=120)
        assert not [line for line in launcher.err if "is not answering; killing it" in line]
    finally:
        launcher.proc.send_signal(signal.SIGTERM)
        code = launcher.proc.wait(timeout=90)
    assert code == 0, "".join(launcher.err[-30:])
