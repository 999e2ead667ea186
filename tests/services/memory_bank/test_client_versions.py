"""Issue 12, finding 1 (client half): a replica that serves another bank, or another shard layout of the
same bank, is never used: the client checks `GetInfo` before using a replica, drops it (logged, counted)
and fails over on FAILED_PRECONDITION / NOT_FOUND / DATA_LOSS, so no request comes back degraded while a
matching replica exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from memory_store import Bank, NodeRef, path_refs
from memory_store.ops import delete_subtrees, reshard
from services.memory_bank.client import BankClient

from .conftest import running_shards

PATHS = [(0, 1, 5), (1, 4, 17), (0, 2, 9), (1, 6, 25)]  # all in shard 0 of the 2-shard layout


@pytest.fixture(scope="module")
def other_versions(bank_dir, tmp_path_factory):
    """The same bank after a delete (another bank_id) and after a reshard to 1 shard (same bank_id)."""
    d = tmp_path_factory.mktemp("versions")
    delete_subtrees(bank_dir, [NodeRef(1, 3)], out=d / "deleted")
    reshard(bank_dir, 1, out=d / "one-shard")
    return d / "deleted", d / "one-shard"


def _fetch_all(client, n=12):
    return [client.fetch(path_refs(PATHS[i % len(PATHS)])) for i in range(n)]


def test_a_replica_of_another_bank_is_dropped_before_use(shards, bank, other_versions):
    addresses, _ = shards
    rejected = []
    with running_shards(other_versions[0], shards=("0",)) as (foreign, _):
        static = {"0": [foreign["0"], addresses["0"]]}
        with BankClient(bank, static_addresses=static, on_reject=lambda a, why: rejected.append((a, why))) as c:
            results = _fetch_all(c)
            assert all(r.failed == {} for r in results), [r.failed for r in results if r.failed]
            assert sum(r.failovers for r in results) == 0  # dropped by GetInfo, never asked for blocks
            assert c.rejected_replicas() == {foreign["0"]: pytest.approx(c.rejected_replicas()[foreign["0"]])}
    assert rejected and rejected[0][0] == foreign["0"] and "bank" in rejected[0][1]


def test_a_replica_of_another_shard_layout_of_the_same_bank_is_dropped(shards, bank, other_versions):
    addresses, _ = shards
    one_shard = Bank.open(other_versions[1])
    assert one_shard.bank_id == bank.bank_id  # reshard keeps bank_id: only the layout tells them apart
    with running_shards(other_versions[1], shards=("0",)) as (foreign, _):
        static = {"0": [foreign["0"], addresses["0"]], "1": [foreign["0"], addresses["1"]]}
        with BankClient(bank, static_addresses=static) as c:
            results = _fetch_all(c) + [c.fetch(path_refs((3, 13, 55))) for _ in range(4)]
            assert all(r.failed == {} for r in results), [r.failed for r in results if r.failed]
            assert foreign["0"] in c.rejected_replicas()


def test_failed_precondition_and_not_found_fail_over_when_a_replica_changes_under_the_client(
        shards, bank, other_versions, bank_dir):
    """A replica verified a moment ago starts serving another version at the same address (a restart
    onto another version): its errors move the call to a matching replica instead of failing nodes."""
    addresses, _ = shards
    with running_shards(bank_dir, shards=("0",)) as (mine, mine_servers):
        target = mine_servers["0"].servicer
        with BankClient(bank, static_addresses={"0": [mine["0"], addresses["0"]]}) as c:
            assert all(r.failed == {} for r in _fetch_all(c, 4))
            saved = target.bank, target.owned
            for other in other_versions:  # deleted (FAILED_PRECONDITION), one-shard layout (NOT_FOUND)
                other_bank = Bank.open(other)
                target.bank = other_bank
                target.owned = [NodeRef(int(r[0]), int(r[1])) for r in other_bank.owned_subtrees("0")]
                try:
                    results = _fetch_all(c, 8)
                finally:
                    target.bank, target.owned = saved
                assert all(r.failed == {} for r in results), [r.failed for r in results if r.failed]


def test_the_client_imports_nothing_from_the_server_modules():
    package = Path(__file__).resolve().parents[3] / "services" / "memory_bank"
    imported = set()
    for name in ("client.py", "replicas.py", "result.py"):  # the client and the modules it is made of
        for node in ast.walk(ast.parse((package / name).read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add(("." * node.level) + (node.module or ""))
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
    server_side = {".servicer", ".server", ".settings", ".interceptor", ".reader", ".cache",
                   "services.memory_bank.servicer", "services.memory_bank.server", "services.memory_bank.settings"}
    assert not imported & server_side, imported & server_side


def test_the_clients_message_limit_matches_the_servers():
    from services.memory_bank import replicas, settings

    assert replicas.MAX_MESSAGE_BYTES == settings.MAX_MESSAGE_BYTES
    assert replicas.SERVICE_NAME == "hiermem.v1.MemoryBank"


def test_one_concurrency_model_the_fetch_runs_in_the_callers_thread(shards, bank):
    """No event loop of the client's own: a one-shard fetch runs in the calling thread (no thread is
    started for it), several shards use a small pool, and the async API is the same fetch in a thread."""
    import asyncio
    import threading

    addresses, _ = shards
    before = {t.ident for t in threading.enumerate()}
    with BankClient(bank, static_addresses=addresses) as c:
        assert not hasattr(c, "_loop")
        assert c.fetch(path_refs((0, 1, 5))).failed == {}
        # static addresses: no thread started (threads of earlier tests may have ended meanwhile)
        assert {t.ident for t in threading.enumerate()} - before == set()
        both = c.fetch(path_refs((0, 1, 5)) + path_refs((3, 13, 55)))
        assert both.failed == {} and set(both.shard_seconds) == {"0", "1"}
        assert asyncio.run(c.afetch(path_refs((2, 9, 37)))).failed == {}
