"""`hiermem generate` through its argparse registration (in-process, tiny anchor)."""

from __future__ import annotations

import argparse
import os
import time

import pytest

from lm.cli import register
from lm.dtype import pick_threads


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hiermem")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_prints_prompt_completion_and_memory_size(capsys, tiny_anchor):
    assert _run(["generate", "The capital of France is", "--anchor", "tiny", "--max-new-tokens", "4",
                 "--synthetic-memory"]) == 0
    out = capsys.readouterr().out
    assert "prompt: 'The capital of France is'" in out
    assert "completion: '" in out and "tokens/s" in out
    # r = (256, 64, 16) units x 3 matrices x d=64 x 4 layers
    assert f"{336 * 3 * 64 * 4 / 1e6:.1f}M params" in out and "SYNTHETIC" in out


def test_generate_chat_without_memory(capsys, tiny_anchor):
    assert _run(["generate", "Hi", "--anchor", "tiny", "--max-new-tokens", "2", "--chat", "--temperature",
                 "0.7", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "memory: none" in out and "tokens: " in out


def test_thread_choice(monkeypatch):
    import lm.dtype

    assert pick_threads("3") == 3
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr(lm.dtype, "busy_cores", lambda: 2.6)
    assert pick_threads("auto") == 1  # 4 cores, 2.6 busy: round(1.4) = 1
    monkeypatch.setattr(lm.dtype, "busy_cores", lambda: 9.0)
    assert pick_threads("auto") == 1
    monkeypatch.setattr(lm.dtype, "busy_cores", lambda: 0.2)
    assert pick_threads("auto") == 4
    # where /proc/stat cannot be read: the 1-minute load average
    monkeypatch.setattr(lm.dtype, "busy_cores", lambda: None)
    monkeypatch.setattr("os.getloadavg", lambda: (2.6, 0.0, 0.0))
    assert pick_threads("auto") == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.0, 0.0))
    assert pick_threads("auto") == 4
    with pytest.raises(SystemExit):
        pick_threads("0")


def test_busy_cores_sees_a_spinning_process():
    """busy_cores samples the machine now: a process spinning beside it counts as (about) one busy core."""
    import multiprocessing

    from lm.dtype import busy_cores

    assert busy_cores(0.05) is not None  # Linux: /proc/stat
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,))
    spinner.start()
    try:
        time.sleep(0.2)
        busy = busy_cores(0.5)
    finally:
        stop.set()
        spinner.join()
    assert busy is not None and 0.6 <= busy <= (os.cpu_count() or 1)


def _spin(stop) -> None:
    while not stop.is_set():
        pass
