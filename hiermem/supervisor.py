"""The supervisor of `hiermem up`: child processes started, watched, restarted and stopped.

Each child runs in its own process group (setsid) and dies with the launcher (PR_SET_PDEATHSIG). A child
started on port 0 reports where it listens with one `LISTENING host:port` line on its output, which the
supervisor reads (and keeps across restarts, so a restarted shard comes back on the same address). Health
waits poll each child's probe; a child that exits, or fails `liveness_failures` probes in a row, is
restarted with exponential back-off; stopping signals whole process groups, SIGTERM then SIGKILL.

A child that logs a `DRAINING` line (the bank and model servers do on SIGTERM, whoever sent it) is not
probed any more: its health endpoint goes away while it finishes in-flight streams. It gets
`stop_timeout_s` to exit, then SIGKILL; once it has exited it is restarted at once (a roll, not a crash).
The back-off returns to its initial value once a child has been healthy for `backoff_reset_s`, so a
shard that crashed a few times in a row is not kept down for long after its next crash.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("hiermem.up")

_LISTENING = re.compile(r"LISTENING (\S+):(\d+)")
_DRAINING = re.compile(r"\bDRAINING\b")


@dataclass
class ChildSpec:
    """How to start one child and how to tell it is healthy."""

    name: str
    argv: Callable[[int], list[str]]
    """Command line for a port (0 the first time for children that report `LISTENING host:port`)."""
    probe: Callable[[str], bool]
    """Health probe, called with the child's host:port."""
    port: int = 0
    """Fixed port; 0 = read it from the child's LISTENING line (and keep it across restarts)."""
    liveness: Callable[[str], bool] | None = None
    """Probe while running (default `probe`): must not fail for reasons outside the child."""
    env: dict[str, str] | None = None
    """Extra environment variables (e.g. a URL with a password, which argv would show to every user)."""


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    address: str | None = None
    healthy: bool = False
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None
    last_probe: float = 0.0
    probe_failures: int = 0
    healthy_since: float = 0.0
    draining_since: float | None = None
    """When the child said it is draining (DRAINING line, or `Supervisor.drain`); None otherwise."""
    listening: threading.Event = field(default_factory=threading.Event)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group: the launcher signals it as a whole, Ctrl-C on the tty does not
    try:  # Linux: SIGTERM the child if the launcher dies without cleaning up (e.g. SIGKILL)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Starts children, restarts crashed ones with back-off, stops them all by process group.

    Children are spawned only from the thread that owns the supervisor (PR_SET_PDEATHSIG follows the
    spawning thread); one reader thread per child forwards its output with a `[name]` prefix and
    catches its `LISTENING host:port` line.
    """

    def __init__(self, *, backoff_initial_s: float = 0.5, backoff_max_s: float = 5.0,
                 backoff_reset_s: float = 10.0, stop_timeout_s: float = 20.0, liveness_interval_s: float = 10.0,
                 liveness_failures: int = 3, stop: threading.Event | None = None, out=None):
        self.children: dict[str, Child] = {}
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.backoff_reset_s = backoff_reset_s
        self.liveness_interval_s, self.liveness_failures = liveness_interval_s, liveness_failures
        self.stop_timeout_s = stop_timeout_s
        self.stop_event = stop or threading.Event()
        self._out = out or sys.stderr
        self._out_lock = threading.Lock()

    def start(self, spec: ChildSpec) -> Child:
        child = self.children.setdefault(spec.name, Child(spec, backoff=self.backoff_initial_s))
        port = spec.port or (int(child.address.rsplit(":", 1)[1]) if child.address else 0)
        argv = spec.argv(port)
        child.listening.clear()
        child.healthy = False
        child.probe_failures = 0
        child.draining_since = None
        if spec.port:
            child.address = f"{_host_of(argv)}:{spec.port}"
            child.listening.set()
        env = {**os.environ, **spec.env} if spec.env else None
        child.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, env=env)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d): %s", spec.name, child.proc.pid, shlex.join(argv))
        threading.Thread(target=self._pump, args=(child, child.proc), daemon=True,
                         name=f"out-{spec.name}").start()
        return child

    def _pump(self, child: Child, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not child.listening.is_set() and (m := _LISTENING.search(line)):
                child.address = f"{_dialable(m.group(1))}:{m.group(2)}"
                child.listening.set()
            elif child.draining_since is None and child.proc is proc and _DRAINING.search(line):
                child.draining_since = time.monotonic()
            with self._out_lock:
                print(f"[{child.spec.name}] {line}", file=self._out, flush=True)

    def wait_healthy(self, names: list[str], timeout: float) -> None:
        """Block until every named child listens and passes its probe; raise if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        pending = list(names)
        while pending:
            if self.stop_event.is_set():
                raise InterruptedError("stopping")
            for name in list(pending):
                child = self.children[name]
                if child.proc is not None and child.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {child.proc.returncode} while starting")
                if child.listening.is_set() and child.address and child.spec.probe(child.address):
                    child.healthy, child.last_probe = True, time.monotonic()
                    child.healthy_since = child.last_probe
                    pending.remove(name)
                    log.info("%s healthy at %s", name, child.address)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}")
            if pending:
                self.stop_event.wait(0.2)

    def address_of(self, name: str) -> str:
        """host:port of a child that has reported where it listens (e.g. after `wait_healthy`)."""
        address = self.children[name].address
        if address is None:
            raise RuntimeError(f"{name} has not reported an address yet")
        return address

    def drain(self, name: str) -> None:
        """SIGTERM one child (e.g. to roll it onto a new bank version): it finishes its in-flight work
        unprobed, and is restarted once it has exited."""
        child = self.children[name]
        if child.proc is not None and child.proc.poll() is None:
            child.draining_since = time.monotonic()
            _signal_group(child.proc, signal.SIGTERM)

    def tick(self) -> None:
        """One round of supervision: notice exits, restart when their back-off has passed, probe the
        running children every `liveness_interval_s` and kill one that fails `liveness_failures` in a row
        (a hung child; the next round restarts it like a crashed one). A draining child is not probed;
        it is killed only if it is still draining after `stop_timeout_s`."""
        now = time.monotonic()
        for child in self.children.values():
            proc = child.proc
            if proc is not None and child.restart_at is None and proc.poll() is not None:
                ran = now - child.started_at
                _signal_group(proc, signal.SIGKILL)  # whatever the crashed child left in its group
                drained = child.draining_since is not None
                if drained or (child.healthy and now - child.healthy_since >= self.backoff_reset_s):
                    child.backoff = self.backoff_initial_s  # a roll, or a crash after a healthy spell
                delay = 0.0 if drained else child.backoff
                child.restart_at = now + delay
                log.warning("%s (pid %d) %s with code %s after %.1f s; restarting in %.1f s",
                            child.spec.name, proc.pid, "drained and exited" if drained else "exited",
                            proc.returncode, ran, delay)
                if not drained:
                    child.backoff = min(child.backoff * 2, self.backoff_max_s)
                child.healthy = False
            elif child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self.start(child.spec)
            elif child.draining_since is not None:
                if now - child.draining_since > self.stop_timeout_s and proc is not None:
                    log.error("%s (pid %d) still draining after %.0f s; killing it", child.spec.name, proc.pid,
                              self.stop_timeout_s)
                    _signal_group(proc, signal.SIGKILL)
                    child.draining_since = now  # once
            elif not child.healthy and child.listening.is_set() and child.address:
                if child.spec.probe(child.address):
                    child.healthy, child.last_probe = True, now
                    child.healthy_since = now
                    log.info("%s healthy again at %s (restart %d)", child.spec.name, child.address,
                             child.restarts)
            elif (child.healthy and child.address and self.liveness_interval_s
                  and now - child.last_probe >= self.liveness_interval_s):
                child.last_probe = now
                if (child.spec.liveness or child.spec.probe)(child.address):
                    child.probe_failures = 0
                    continue
                if child.draining_since is not None:  # it said DRAINING while the probe ran
                    continue
                child.probe_failures += 1
                log.warning("%s failed a health probe (%d in a row)", child.spec.name, child.probe_failures)
                if child.probe_failures >= self.liveness_failures and proc is not None:
                    log.error("%s (pid %d) is not answering; killing it", child.spec.name, proc.pid)
                    _signal_group(proc, signal.SIGKILL)

    def run(self, interval: float = 0.25) -> None:
        """Supervise until the stop event is set."""
        while not self.stop_event.is_set():
            self.tick()
            self.stop_event.wait(interval)

    def stop_all(self, order: list[str] | None = None) -> None:
        """SIGTERM each child's process group in `order` (then the rest), SIGKILL what outlives the grace."""
        first = [n for n in order or [] if n in self.children]
        names = first + [n for n in reversed(self.children) if n not in first]
        for name in names:
            child = self.children[name]
            child.restart_at = None
            proc = child.proc
            if proc is None:
                continue
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s; killing it", name, self.stop_timeout_s)
            _signal_group(proc, signal.SIGKILL)  # also reaps grandchildren left in the group
            proc.wait()
            log.info("stopped %s (pid %d, code %s)", name, proc.pid, proc.returncode)


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child called setsid(), so its pgid is its pid
    except ProcessLookupError:
        pass


def _dialable(host: str) -> str:
    """A wildcard bind is reached through loopback (for probes, static addresses and the printed URL)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]", "") else host


def _host_of(argv: list[str]) -> str:
    return _dialable(argv[argv.index("--host") + 1]) if "--host" in argv else "127.0.0.1"
