"""Engine over FakeRunner: continuous batching, chunked prefill, shared blocks, cancel, back-pressure."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.model_server.engine import Engine, GenRequest
from services.model_server.errors import Overloaded
from services.model_server.request_memory import RequestMemory
from services.model_server.sampling import Sampling
from services.model_server.scheduler import Scheduler

from .fakes import FakeRunner


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.kind != "token":
            self.done.set()

    @property
    def text(self):
        return "".join(e.text for e in self.events if e.kind == "token")


def _req(prompt="ab", n=4, keys=(), value=1.0, **kw):
    sink = Collector()
    blocks = [torch.full((1, 3, 2, 4), value) for _ in keys]
    return GenRequest(prompt_ids=[ord(c) for c in prompt], params=Sampling(max_new_tokens=n, **kw), sink=sink,
                      memory=RequestMemory(dict(zip(keys, blocks, strict=True)))), sink


def _wait_free(eng, n, timeout=2.0):
    """Finished rows are reaped on the engine's next turn: wait for `n` free KV slots."""
    deadline = time.monotonic() + timeout
    while eng.snapshot()["free_slots"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return eng.snapshot()["free_slots"] == n


@pytest.fixture
def engine_factory():
    engines = []

    def make(runner=None, mode="subtree", max_queue=8, chunk=4, max_wait_s=2.0, max_rows=None, admit_group=1):
        eng = Engine(runner or FakeRunner(), scheduler=Scheduler(mode, max_wait_s, admit_group=admit_group),
                     max_queue=max_queue,
                     prefill_chunk=chunk, max_rows=max_rows)
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.stop()


def test_rows_join_and_leave_between_steps(engine_factory):
    runner = FakeRunner(n_slots=4, step_delay=0.01)
    eng = engine_factory(runner)
    long_req, long_sink = _req("hello world prompt", n=60)
    eng.submit(long_req)
    eng.start()
    time.sleep(0.1)
    short_req, short_sink = _req("x", n=3)
    eng.submit(short_req)
    assert short_sink.done.wait(5)
    assert not long_sink.done.is_set()  # the short one was answered while the long one runs
    third, third_sink = _req("y", n=3)
    eng.submit(third)
    assert third_sink.done.wait(5) and long_sink.done.wait(5)
    assert len(short_sink.text) == 3 and len(long_sink.text) == 60 and len(third_sink.text) == 3
    assert max(runner.decode_batches) == 2 and runner.decode_batches[-1] == 1  # joined, then left at once
    # the 18-token prompt was prefilled in chunks of 4 while nothing else ran
    assert [n for s, n in runner.prefill_calls][:5] == [4, 4, 4, 4, 2]
    assert _wait_free(eng, 4) and eng.stats.completed == 3
    assert not runner.lengths  # every KV slot released


def test_prompts_that_arrive_together_are_prefilled_in_one_forward(engine_factory):
    """Requests waiting together are prefilled by one forward while their padded chunks fit `prefill_chunk`
    tokens; a longer prompt goes on in chunks, and every row's output is what it gets alone."""
    runner = FakeRunner(n_slots=4)
    eng = engine_factory(runner, chunk=8)
    reqs = [_req(p, n=3) for p in ("ab", "cde", "fg", "hijklmnopq")]
    for req, _ in reqs:
        eng.submit(req)
    eng.start()
    assert all(sink.done.wait(5) for _, sink in reqs)
    # "ab" + "cde" pad to 2 x 3 <= 8 tokens ("fg" would make 3 x 3); "fg" + 8 of the long prompt would be
    # 2 x 8: so "fg" alone, then the long prompt in 8 + 2
    assert runner.prefill_forwards == [2, 1, 1, 1]
    assert sorted(n for _, n in runner.prefill_calls) == [2, 2, 2, 3, 8]  # the 10-token prompt in 8 + 2
    alone = [_req(p, n=3) for p in ("ab", "cde", "fg", "hijklmnopq")]
    solo = FakeRunner(n_slots=1)
    eng2 = engine_factory(solo, chunk=8)
    eng2.start()
    for (req, sink), (_, together) in zip(alone, reqs, strict=True):
        eng2.submit(req)
        assert sink.done.wait(5) and sink.text == together.text


def test_one_kv_slot_per_row(engine_factory):
    """max_rows never exceeds the runner's KV slots (there is no spare slot for finished rows any more)."""
    eng = engine_factory(FakeRunner(n_slots=2), max_rows=8)
    assert eng.max_rows == 2


def test_shared_nodes_are_one_block_in_the_batch(engine_factory):
    runner = FakeRunner(n_slots=4, step_delay=0.01)
    eng = engine_factory(runner)
    reqs = [_req("p", n=6, keys=("L1", f"L2-{i % 2}")) for i in range(4)]
    for r, _ in reqs:
        eng.submit(r)
    eng.start()
    for _, sink in reqs:
        assert sink.done.wait(5)
    assert max(len(s) for s in runner.synced) == 3  # L1 once + two distinct level-2 blocks
    widest = max(runner.decoded_rows, key=len)
    assert len(widest) == 4 and len(set(widest)) == 2
    deadline = time.monotonic() + 2
    while runner.synced[-1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.synced[-1] == set()  # when every row has left, no block is held


def test_blocks_of_admitted_rows_are_held_until_they_leave(engine_factory):
    """set_blocks holds the union of the blocks of every admitted row: a prefilling row's blocks join
    the decoding rows' ones, and a finished row's private block goes at the next sync."""
    runner = FakeRunner(n_slots=4, step_delay=0.01)
    eng = engine_factory(runner)
    long_req, long_sink = _req("p", n=40, keys=("L1", "L2-long"))
    eng.submit(long_req)
    eng.start()
    time.sleep(0.1)
    short_req, short_sink = _req("q", n=2, keys=("L1", "L2-short"))
    eng.submit(short_req)
    assert short_sink.done.wait(5) and long_sink.done.wait(5)
    assert {"L1", "L2-long", "L2-short"} in runner.synced
    after = runner.synced[runner.synced.index({"L1", "L2-long", "L2-short"}) + 1]
    assert after == {"L1", "L2-long"}


def test_cancel_frees_slot(engine_factory):
    runner = FakeRunner(n_slots=1, step_delay=0.005)
    eng = engine_factory(runner)
    req, sink = _req(n=10_000, ignore_eos=True)
    eng.submit(req)
    eng.start()
    time.sleep(0.1)
    assert eng.snapshot()["active"] == 1
    eng.cancel(req)
    assert sink.done.wait(5) and sink.events[-1].finish_reason == "cancelled"
    nxt, nsink = _req(n=2)
    eng.submit(nxt)
    assert nsink.done.wait(5) and _wait_free(eng, 1)


def test_queue_full_raises_overloaded(engine_factory):
    eng = engine_factory(FakeRunner(n_slots=1), max_queue=2)  # not started: nothing drains
    eng.submit(_req()[0])
    eng.submit(_req()[0])
    with pytest.raises(Overloaded) as info:
        eng.submit(_req()[0])
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"


def test_eos_and_failure_do_not_kill_the_engine(engine_factory):
    runner = FakeRunner(n_slots=2)
    runner.eos_after = 2
    eng = engine_factory(runner)
    eng.start()
    req, sink = _req(n=10)
    eng.submit(req)
    assert sink.done.wait(5) and sink.events[-1].finish_reason == "eos_token" and len(sink.text) == 2

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    runner.eos_after = None
    orig, runner.decode = runner.decode, boom
    bad, bsink = _req(n=3)
    eng.submit(bad)
    assert bsink.done.wait(5) and bsink.events[-1].kind == "error"
    runner.decode = orig
    good, gsink = _req(n=3)
    eng.submit(good)
    assert gsink.done.wait(5) and len(gsink.text) == 3 and eng.alive


def test_seeded_sampling_is_reproducible(engine_factory):
    runner = FakeRunner(n_slots=2)
    eng = engine_factory(runner)
    eng.start()
    outs = []
    for _ in range(2):
        req, sink = _req(n=5, temperature=1.0, seed=7)
        eng.submit(req)
        assert sink.done.wait(5)
        outs.append(sink.text)
    assert outs[0] == outs[1] and len(outs[0]) == 5


def test_admit_group_holds_a_single_free_row_while_several_wait(engine_factory):
    """With admit_group 2 a single freed row stays empty while two or more wait (the scheduler then
    chooses a group); every waiting request is still served."""
    runner = FakeRunner(n_slots=3, step_delay=0.002)
    eng = engine_factory(runner, max_rows=3, admit_group=2, max_wait_s=60)
    long_a, sa = _req(n=400, keys=["A"])
    long_b, sb = _req(n=400, keys=["B"])
    short, ss = _req(n=8, keys=["C"])
    late = [_req(n=2, keys=[k]) for k in ("X", "Y", "Y")]
    for r in (long_a, long_b, short):
        eng.submit(r)
    eng.start()
    while eng.snapshot()["free_slots"]:
        time.sleep(0.001)
    for r, _ in late:  # every row busy: they all wait
        eng.submit(r)
    assert ss.done.wait(5)
    time.sleep(0.02)
    assert all(r.first_token_at is None for r, _ in late)  # one row free, three wait: held
    eng.cancel(long_a)  # a second row frees up
    assert all(sink.done.wait(5) for _, sink in late)
