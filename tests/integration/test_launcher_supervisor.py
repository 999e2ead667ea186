"""The launcher's supervisor with stand-in children: real processes serving grpc.health.v1.

These pin the supervision behaviour (LISTENING line, health wait, restart on the same port with back-off,
stop by process group with no survivor) independently of the real bank and model servers, which
test_launcher_stack.py exercises end to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from hiermem.launcher import probe_grpc
from hiermem.supervisor import ChildSpec, Supervisor

pytestmark = pytest.mark.integration

# A gRPC server with the health service that binds --port (0 = free), logs LISTENING like the real
# services, and also forks a grandchild (to prove that stopping kills the whole process group).
FAKE_SHARD = textwrap.dedent('''
    import logging, subprocess, sys, time
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    port = int(sys.argv[sys.argv.index("--port") + 1])
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    subprocess.Popen(["sleep", "300"])
    logging.info("LISTENING 127.0.0.1:%d", port)
    server.wait_for_termination()
''')


@pytest.fixture
def fake_shard(tmp_path):
    script = tmp_path / "fake_shard.py"
    script.write_text(FAKE_SHARD)
    return lambda name: ChildSpec(name, lambda port: [sys.executable, str(script), "--port", str(port)],
                                  probe_grpc)


def _tree(pid: int) -> list[int]:
    proc = psutil.Process(pid)
    return [pid] + [c.pid for c in proc.children(recursive=True)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_child_comes_back_on_its_port_and_stop_leaves_no_process(fake_shard):
    sup = Supervisor(backoff_initial_s=0.2, backoff_max_s=1.0, stop_timeout_s=5.0)
    try:
        for name in ("shard-0/r0", "shard-1/r0"):
            sup.start(fake_shard(name))
        sup.wait_healthy(["shard-0/r0", "shard-1/r0"], timeout=60)
        victim = sup.children["shard-0/r0"]
        address, old_pid = victim.address, victim.proc.pid
        old_tree = _tree(old_pid)
        assert probe_grpc(address) and len(old_tree) == 2
        assert _probe_cli("--grpc", address) == 0  # what the compose healthcheck runs

        os.kill(old_pid, signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and not (victim.proc.pid != old_pid and probe_grpc(address, 0.5)):
            sup.tick()  # what sup.run() does, in this (the spawning) thread
            time.sleep(0.1)
        assert victim.proc.pid != old_pid, "crashed child was not restarted"
        assert victim.address == address and probe_grpc(address), "restarted child does not serve its port"
        assert victim.restarts == 1
        while not victim.healthy and time.monotonic() - t0 < 10:
            sup.tick()
            time.sleep(0.1)
        assert victim.healthy
        assert not [p for p in old_tree if _alive(p)], "the crashed child's group was not cleaned up"
        pids = [p for c in sup.children.values() for p in _tree(c.proc.pid)]
        assert len(pids) >= 4  # two children, each with its grandchild
    finally:
        sup.stop_event.set()
        sup.stop_all()
    survivors = [psutil.Process(p) for p in pids if _alive(p)]
    assert not survivors, [(s.pid, s.cmdline(), s.status(), s.ppid()) for s in survivors]
    assert not probe_grpc(address, 0.5)
    assert _probe_cli("--grpc", address) == 1


def _probe_cli(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "hiermem.launcher", "probe", *args, "--timeout", "1"],
                          capture_output=True, timeout=60).returncode


def test_a_child_that_exits_while_starting_fails_fast(tmp_path):
    sup = Supervisor()
    sup.start(ChildSpec("broken", lambda port: [sys.executable, "-c", "raise SystemExit(3)"], probe_grpc))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="broken exited with code 3"):
        sup.wait_healthy(["broken"], timeout=30)
    assert time.monotonic() - t0 < 15
    sup.stop_all()


def test_backoff_doubles_up_to_its_cap():
    sup = Supervisor(backoff_initial_s=0.05, backoff_max_s=0.2)
    spec = ChildSpec("crasher", lambda port: [sys.executable, "-c", "raise SystemExit(1)"], probe_grpc)
    child = sup.start(spec)
    delays = []
    deadline = time.monotonic() + 30
    while child.restarts < 4 and time.monotonic() < deadline:
        before = child.restart_at
        sup.tick()
        if before is None and child.restart_at is not None:
            delays.append(round(child.restart_at - time.monotonic(), 2))
        time.sleep(0.01)
    sup.stop_all()
    assert child.restarts == 4
    assert delays[:4] == pytest.approx([0.05, 0.1, 0.2, 0.2], abs=0.03)


def test_a_hung_child_is_killed_and_restarted(fake_shard):
    sup = Supervisor(backoff_initial_s=0.2, liveness_interval_s=0.2, liveness_failures=2, stop_timeout_s=5.0)
    try:
        child = sup.start(fake_shard("shard-0/r0"))
        sup.wait_healthy(["shard-0/r0"], timeout=60)
        old_pid = child.proc.pid
        os.kill(old_pid, signal.SIGSTOP)  # alive but deaf: only a health probe can tell
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (child.proc.pid != old_pid and child.healthy):
            sup.tick()
            time.sleep(0.05)
        assert child.proc.pid != old_pid and child.healthy and probe_grpc(child.address)
        assert not _alive(old_pid)
    finally:
        sup.stop_all()


def test_children_die_with_a_killed_launcher(tmp_path):
    """kill -9 of the launcher cannot run any cleanup; PR_SET_PDEATHSIG still stops its children."""
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent('''
        import sys, time
        from hiermem.launcher import probe_grpc
        from hiermem.supervisor import ChildSpec, Supervisor
        sup = Supervisor()
        child = sup.start(ChildSpec("c", lambda port: ["sleep", "300"], probe_grpc))
        print(child.proc.pid, flush=True)
        time.sleep(300)
    '''))
    launcher = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child_pid = int(launcher.stdout.readline())
    assert _alive(child_pid)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)


def test_address_of_is_known_once_the_child_reports_it_or_has_a_fixed_port(fake_shard):
    sup = Supervisor(stop_timeout_s=5.0)
    idle = [sys.executable, "-c", "import time; time.sleep(30)"]
    try:
        sup.start(ChildSpec("mute", lambda port: idle, probe_grpc))
        with pytest.raises(RuntimeError, match="mute has not reported an address"):
            sup.address_of("mute")
        # a fixed port needs no LISTENING line; a wildcard bind is dialled through loopback
        sup.start(ChildSpec("fixed", lambda port: [*idle, "--host", "0.0.0.0"], probe_grpc, port=45678))
        assert sup.address_of("fixed") == "127.0.0.1:45678"
        sup.start(fake_shard("shard-0/r0"))
        sup.wait_healthy(["shard-0/r0"], timeout=60)
        address = sup.address_of("shard-0/r0")
        assert address.startswith("127.0.0.1:") and address != "127.0.0.1:0" and probe_grpc(address)
    finally:
        sup.stop_all()


# A stand-in model server: /health answers 200, /stream sends 200 lines 20 ms apart. On SIGTERM it does
# what uvicorn does (stops listening, so /health fails, and lets in-flight responses finish), after
# logging DRAINING like the real services.
FAKE_HTTP = textwrap.dedent('''
    import logging, signal, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        def log_message(self, *a): pass
        def do_GET(self):
            self.send_response(200); self.end_headers()
            if self.path == "/stream":
                for i in range(200):
                    self.wfile.write(f"token {i}\\n".encode()); self.wfile.flush(); time.sleep(0.02)
            else:
                self.wfile.write(b"ok")
    port = int(sys.argv[sys.argv.index("--port") + 1])
    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    srv.daemon_threads = False
    srv.block_on_close = True
    def on_term(*_):
        logging.info("DRAINING: finishing in-flight requests")
        threading.Thread(target=srv.shutdown).start()
    signal.signal(signal.SIGTERM, on_term)
    logging.info("LISTENING 127.0.0.1:%d", srv.server_address[1])
    srv.serve_forever()
    srv.server_close()   # joins the request threads: in-flight streams finish
''')


def _http_probe(addr: str) -> bool:
    import httpx

    try:
        return httpx.get(f"http://{addr}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_draining_child_is_not_probed_to_death(tmp_path):
    """Issue 12, finding 5: after SIGTERM a server's /health fails while its streams finish; the liveness
    probe must leave it alone (it used to SIGKILL it and cut a stream at 91 of 200 tokens)."""
    import httpx

    script = tmp_path / "fake_http.py"
    script.write_text(FAKE_HTTP)
    sup = Supervisor(backoff_initial_s=0.1, liveness_interval_s=0.2, liveness_failures=2, stop_timeout_s=20.0)
    lines: list[str] = []
    try:
        child = sup.start(ChildSpec("model", lambda port: [sys.executable, str(script), "--port", str(port)],
                                    _http_probe))
        sup.wait_healthy(["model"], timeout=60)
        old_pid = child.proc.pid

        def stream():
            with httpx.stream("GET", f"http://{child.address}/stream", timeout=30) as r:
                lines.extend(r.iter_lines())

        import threading

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)
        os.kill(old_pid, signal.SIGTERM)  # e.g. an operator rolling the model server
        old_proc = child.proc
        while reader.is_alive():
            sup.tick()
            time.sleep(0.05)
        assert len([ln for ln in lines if ln]) == 200, f"stream cut at {len(lines)} of 200"
        old_proc.wait(10)
        assert old_proc.returncode == 0, f"the draining child was killed ({old_proc.returncode})"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (child.proc.pid != old_pid and child.healthy):
            sup.tick()
            time.sleep(0.05)
        assert child.proc.pid != old_pid and child.healthy  # and it comes back
    finally:
        sup.stop_all()


def test_a_draining_child_that_never_exits_is_killed_after_the_stop_timeout(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent('''
        import signal, sys, time
        print("LISTENING 127.0.0.1:1", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: print("DRAINING", flush=True))
        time.sleep(300)
    '''))
    sup = Supervisor(backoff_initial_s=0.1, liveness_interval_s=0.2, liveness_failures=2, stop_timeout_s=1.0)
    try:
        child = sup.start(ChildSpec("stuck", lambda port: [sys.executable, str(script)], lambda a: True))
        sup.wait_healthy(["stuck"], timeout=30)
        proc = child.proc
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 10:
            sup.tick()
            time.sleep(0.05)
        assert proc.poll() is not None and 0.9 < time.monotonic() - t0 < 5
    finally:
        sup.stop_all()


def test_backoff_resets_once_a_child_has_been_healthy_for_a_while(tmp_path, fake_shard):
    """Issue 12, finding 11: after a series of crashes the delay had grown (to 16 s), and a shard that
    crashed again after being healthy stayed down that long."""
    counter = tmp_path / "starts"
    counter.write_text("0")
    script = tmp_path / "flappy.py"
    script.write_text(textwrap.dedent(f'''
        import pathlib, sys
        c = pathlib.Path({str(counter)!r}); n = int(c.read_text()) + 1; c.write_text(str(n))
        if n <= 4:
            raise SystemExit(1)   # the first starts crash at once (a dependency is down)
    ''') + FAKE_SHARD)
    sup = Supervisor(backoff_initial_s=0.1, backoff_max_s=10.0, backoff_reset_s=1.0, stop_timeout_s=5.0)
    try:
        child = sup.start(ChildSpec("shard-0/r0", lambda port: [sys.executable, str(script), "--port",
                                                                str(port)], probe_grpc))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not child.healthy:
            sup.tick()
            time.sleep(0.02)
        assert child.healthy and child.restarts == 4 and child.backoff >= 1.6  # 0.1 0.2 0.4 0.8 -> 1.6
        t_healthy = time.monotonic()
        while time.monotonic() - t_healthy < 1.5:  # healthy for longer than backoff_reset_s
            sup.tick()
            time.sleep(0.05)
        os.kill(child.proc.pid, signal.SIGKILL)
        while child.restart_at is None:
            sup.tick()
            time.sleep(0.01)
        assert child.restart_at - time.monotonic() <= 0.15, "the back-off did not reset"
    finally:
        sup.stop_all()
