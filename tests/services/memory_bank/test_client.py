"""BankClient against in-process shards: sync and async APIs, failover, deadlines, splitting, reasons."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from memory_store import NodeRef, path_refs
from services.memory_bank.client import BankClient
from tests.integration.procs import free_port


def same_as_bank(bank, blocks):
    return all(torch.equal(t, bank.read_block(r)) for r, t in blocks.items())


def test_sync_and_async_fetch_return_the_banks_blocks(shards, bank):
    addresses, _ = shards
    refs = path_refs((0, 1, 5)) + path_refs((3, 13, 55))
    with BankClient(bank, static_addresses=addresses) as client:
        result = client.fetch(refs)
        assert result.failed == {} and set(result.blocks) == set(refs) and same_as_bank(bank, result.blocks)
        assert result.blocks[NodeRef(1, 0)].dtype == torch.float16
        assert result.blocks[NodeRef(1, 0)].shape == (2, 3, 8, 128)
        assert result.nbytes == sum(bank.block_info(r).nbytes for r in refs)

        async def from_another_loop():  # e.g. the model server's FastAPI loop
            return await asyncio.gather(client.afetch(refs[:3]), client.afetch(refs[3:]))

        a, b = asyncio.run(from_another_loop())
        assert a.failed == b.failed == {} and same_as_bank(bank, {**a.blocks, **b.blocks})


def test_fails_over_from_a_dead_replica_and_then_prefers_the_live_one(shards, bank):
    addresses, _ = shards
    dead = f"127.0.0.1:{free_port()}"
    with BankClient(bank, static_addresses={"0": [dead, addresses["0"]]}) as client:
        results = [client.fetch(path_refs((1, 4, 17))) for _ in range(3)]
    assert all(r.failed == {} and same_as_bank(bank, r.blocks) for r in results)
    assert sum(r.failovers for r in results) == 1  # the dead replica is tried last after its failure


def test_a_hung_replica_costs_one_attempt_deadline(shards, bank):
    addresses, _ = shards
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts TCP connections, never speaks HTTP/2
    conns = []
    stop = threading.Event()

    def accept():
        hung.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(hung.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        address = f"127.0.0.1:{hung.getsockname()[1]}"
        with BankClient(bank, static_addresses={"1": [address, addresses["1"]]}, attempt_timeout_s=0.5) as client:
            t0 = time.monotonic()
            # round robin starts with the first address on the first fetch
            result = client.fetch(path_refs((2, 9, 37)))
            elapsed = time.monotonic() - t0
        assert result.failed == {} and same_as_bank(bank, result.blocks)
        assert result.failovers == 1 and 0.4 < elapsed < 5
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        hung.close()


def test_reasons_for_nodes_that_cannot_be_had(shards, bank):
    addresses, _ = shards
    dead = f"127.0.0.1:{free_port()}"
    with BankClient(bank, static_addresses={"0": [addresses["0"]], "1": [dead]}, timeout_s=3) as client:
        result = client.fetch([(1, 0), (3, 20), (1, 3), (4, 0)])
    assert set(result.blocks) == {(1, 0)}
    assert "absent" in result.failed[(3, 20)]
    assert "UNAVAILABLE" in result.failed[(1, 3)]
    assert "invalid node" in result.failed[(4, 0)]


def test_unknown_shard_and_splitting_into_calls(shards, bank):
    addresses, _ = shards
    with BankClient(bank, static_addresses={"0": [addresses["0"]]}, max_nodes_per_call=2) as client:
        refs = [(3, i) for i in range(10) if i != 20]
        result = client.fetch(refs + [(1, 2)])
    assert set(result.blocks) == set(refs) and same_as_bank(bank, result.blocks)  # 5 calls of <= 2 nodes
    assert "no replica known for shard 1" in result.failed[(1, 2)]


def test_needs_an_address_source(bank):
    with pytest.raises(ValueError):
        BankClient(bank)


def test_a_block_failing_the_clients_own_check_is_fetched_again_elsewhere(shards, bank, bank_dir, monkeypatch):
    import services.memory_bank.client as client_module

    from .conftest import running_shards

    real = client_module.crc32c.crc32c
    calls = []

    def flaky(data, *args):
        calls.append(len(data))
        return real(data, *args) ^ (1 if len(calls) == 1 else 0)  # the first block received looks corrupt

    monkeypatch.setattr(client_module, "crc32c", SimpleNamespace(crc32c=flaky))  # the client's only
    addresses, _ = shards
    with running_shards(bank_dir, shards=("0",)) as (second, _):
        with BankClient(bank, static_addresses={"0": [addresses["0"], second["0"]]}) as client:
            result = client.fetch(path_refs((1, 6, 25)))
    assert result.failed == {} and same_as_bank(bank, result.blocks)
    assert result.failovers == 1


def test_a_verified_replica_that_goes_silent_leaves_time_to_fail_over(shards, bank, bank_dir):
    """A replica checked a moment ago stops answering (a restart on its port, a hung process): with the
    default attempt deadline as long as the whole fetch's, the call still gives it up after half the
    time left and the other replica answers: nothing fails."""
    import asyncio

    from .conftest import running_shards

    addresses, _ = shards
    with running_shards(bank_dir, shards=("1",)) as (mine, servers):
        with BankClient(bank, static_addresses={"1": [mine["1"], addresses["1"]]}, timeout_s=2.0) as client:
            assert client.attempt_timeout_s >= client.timeout_s
            assert all(client.fetch(path_refs((2, 9, 37))).failed == {} for _ in range(2))  # both verified

            async def silent(*_args, **_kwargs):
                await asyncio.sleep(30)
                yield  # an async generator that never yields in time

            servers["1"].servicer._block_chunks = silent
            results, elapsed = [], []
            for _ in range(3):
                t0 = time.monotonic()
                results.append(client.fetch(path_refs((2, 9, 37))))
                elapsed.append(time.monotonic() - t0)
    assert all(r.failed == {} and same_as_bank(bank, r.blocks) for r in results), [r.failed for r in results]
    assert sum(r.failovers for r in results) == 1  # the silent one is asked last after that
    assert max(elapsed) < 1.8, elapsed


def test_an_int8_bank_is_served_packed_and_counts_its_smaller_bytes(tmp_path):
    from memory_store import Bank
    from tests.integration.procs import build_test_bank
    from tests.services.memory_bank.conftest import running_shards

    q = Bank.open(build_test_bank(tmp_path / "q", dtype="int8"))
    f16 = Bank.open(build_test_bank(tmp_path / "f16", dtype="float16"))
    refs = path_refs((1, 6, 27))
    with running_shards(q.dir, chunk_bytes=4096) as (addresses, _), BankClient(q, static_addresses=addresses) as c:
        result = c.fetch(refs)
    assert result.failed == {}
    for r in refs:
        assert torch.equal(result.blocks[r], q.read_block(r, packed=True))  # rows with their scales, byte for byte
    assert result.nbytes == sum(q.block_info(r).nbytes for r in refs)
    assert result.nbytes < 0.6 * sum(f16.block_info(r).nbytes for r in refs)
