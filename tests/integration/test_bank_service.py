"""The bank service as operators run it: a real redis-server, shard replicas as subprocesses, the client
finding them through Redis. Shard 0 has replicas a and b (b's copy of the bank has one flipped byte),
shard 1 has replica a; destructive tests start their own extra replicas."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import torch

from memory_store import Bank, NodeRef, path_refs
from services.memory_bank import wire
from services.memory_bank._gen import memory_bank_pb2 as pb
from services.memory_bank.client import BankClient
from services.memory_bank.registry import replica_pattern
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ABSENT = (3, 20)  # deleted node, in shard 0
CORRUPT = (3, 7)  # flipped byte in replica b of shard 0
SHARD_ARGS = ["--heartbeat-s", "0.5", "--registry-ttl-s", "2", "--max-nodes-per-call", "40",
              "--metrics-port", "0", "--grace-s", "10"]
FETCH = "/hiermem.v1.MemoryBank/FetchBlocks"


@dataclass
class Cluster:
    bank: Bank
    bank_a: Path
    bank_b: Path
    redis: procs.RedisServer
    s0a: procs.ManagedProcess
    s0b: procs.ManagedProcess
    s1a: procs.ManagedProcess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("cluster")
    bank_a = procs.build_test_bank(root / "bank-a", d_model=512, ranks=(64, 32, 16), absent=[ABSENT])
    bank_b = root / "bank-b"
    shutil.copytree(bank_a, bank_b)
    procs.corrupt_block(bank_b, "0", *CORRUPT, byte=1000)
    started = []
    try:
        for shard, replica, bank_dir in (("0", "a", bank_a), ("0", "b", bank_b), ("1", "a", bank_a)):
            cmd = procs.bank_shard_cmd(bank_dir, shard, redis_url=redis_server.url, replica_id=replica,
                                       extra_args=SHARD_ARGS)
            started.append(procs.ManagedProcess(cmd, f"shard {shard}/{replica}"))  # start all, then wait
        for p in started:
            p.wait_listening(90)
        yield Cluster(Bank.open(bank_a), bank_a, bank_b, redis_server, *started)
    finally:
        for p in started:
            p.kill9()


def raw_fetch(address: str, request: pb.FetchBlocksRequest | bytes, timeout: float = 10.0):
    """FetchBlocks without the client: returns (status code, decoded chunks)."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    chunks = []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(FETCH, request_serializer=lambda b: b, response_deserializer=wire.decode_chunk)
        try:
            chunks.extend(call(payload, timeout=timeout))
        except grpc.RpcError as exc:
            return exc.code(), chunks
    return grpc.StatusCode.OK, chunks


def request(bank: Bank, *refs, bank_id: str | None = None) -> pb.FetchBlocksRequest:
    return pb.FetchBlocksRequest(bank_id=bank.bank_id if bank_id is None else bank_id,
                                 nodes=[pb.NodeRef(level=lv, index=ix) for lv, ix in refs])


def assert_blocks_match(bank: Bank, blocks: dict) -> None:
    for ref, tensor in blocks.items():
        want = bank.read_block(ref)
        assert tensor.dtype == want.dtype and tensor.shape == want.shape
        assert torch.equal(tensor, want), f"block {ref} differs from the bank"


def random_paths(bank: Bank, n: int, seed: int) -> list[tuple[int, ...]]:
    emb = np.random.default_rng(seed).standard_normal((n, bank.tree.dim)).astype(np.float32)
    return [tuple(int(i) for i in p) for p in bank.tree.route(emb)]


def shard0_paths(bank: Bank) -> list[list[NodeRef]]:
    """Paths below level-1 nodes 0 and 1 (shard 0), avoiding the deleted node."""
    out = []
    for i1 in (0, 1):
        for i2 in range(4 * i1, 4 * i1 + 4):
            for i3 in range(4 * i2, 4 * i2 + 4):
                if (3, i3) != ABSENT:
                    out.append(path_refs((i1, i2, i3)))
    return out


def test_client_fetches_paths_through_redis_discovery(cluster):
    with BankClient(cluster.bank, redis_url=cluster.redis.url) as client:
        replicas = client.replicas()
        assert sorted(replicas["0"]) == sorted([cluster.s0a.address, cluster.s0b.address])
        assert replicas["1"] == [cluster.s1a.address]
        refs = [r for p in random_paths(cluster.bank, 6, seed=1) + [(3, 13, 55)] for r in path_refs(p)]
        refs = [r for r in refs if r not in (ABSENT, CORRUPT)]
        result = client.fetch(refs)
        assert result.failed == {}
        assert set(result.blocks) == set(refs)
        assert {cluster.bank.shard_of(r) for r in refs} == {"0", "1"}  # both shards were asked
        assert_blocks_match(cluster.bank, result.blocks)


def test_get_info_health_and_reflection(cluster):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(cluster.s0a.address) as channel:
        get_info = channel.unary_unary("/hiermem.v1.MemoryBank/GetInfo",
                                       request_serializer=pb.GetInfoRequest.SerializeToString,
                                       response_deserializer=pb.GetInfoResponse.FromString)
        info = get_info(pb.GetInfoRequest(), timeout=5)
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert info.bank_id == cluster.bank.bank_id
    assert (info.shard_id, info.replica_id) == ("0", "a")
    assert [(n.level, n.index) for n in info.owned] == [(1, 0), (1, 1)]
    assert json.loads(info.spec_json) == json.loads(cluster.bank.spec.model_dump_json())
    assert info.max_nodes_per_call == 40
    assert "hiermem.v1.MemoryBank" in services and "grpc.health.v1.Health" in services
    for p in (cluster.s0a, cluster.s0b, cluster.s1a):
        assert procs.health_status(p.address) == "SERVING"
        assert procs.health_status(p.address, "hiermem.v1.MemoryBank") == "SERVING"


@pytest.mark.parametrize("case, code", [
    ("wrong_bank_id", grpc.StatusCode.FAILED_PRECONDITION),
    ("node_of_other_shard", grpc.StatusCode.NOT_FOUND),
    ("deleted_node", grpc.StatusCode.NOT_FOUND),
    ("garbage_bytes", grpc.StatusCode.INVALID_ARGUMENT),
    ("no_nodes", grpc.StatusCode.INVALID_ARGUMENT),
    ("level_zero", grpc.StatusCode.INVALID_ARGUMENT),
    ("index_out_of_range", grpc.StatusCode.INVALID_ARGUMENT),
    ("duplicate_node", grpc.StatusCode.INVALID_ARGUMENT),
    ("too_many_nodes", grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_status_codes(cluster, case, code):
    bank = cluster.bank
    req = {
        "wrong_bank_id": request(bank, (1, 0), bank_id="0" * 64),
        "node_of_other_shard": request(bank, (1, 0), (1, 3)),
        "deleted_node": request(bank, ABSENT),
        "garbage_bytes": b"\x12\xff\xff\xff\xff\x0f",
        "no_nodes": request(bank),
        "level_zero": request(bank, (0, 0)),
        "index_out_of_range": request(bank, (2, 16)),
        "duplicate_node": request(bank, (1, 0), (1, 0)),
        "too_many_nodes": request(bank, *[(3, i) for i in range(41)]),
    }[case]
    got, chunks = raw_fetch(cluster.s0a.address, req)
    assert got == code
    if case == "node_of_other_shard":  # the stream stops at the missing node; the block before it is whole
        assert [c.header.node.index for c in chunks if c.header is not None] == [0]


def test_client_reports_deleted_and_invalid_nodes(cluster):
    with BankClient(cluster.bank, static_addresses={"0": [cluster.s0a.address], "1": [cluster.s1a.address]}) as c:
        result = c.fetch([(1, 0), ABSENT, (2, 99), (3, 40)])
    assert set(result.blocks) == {(1, 0), (3, 40)}
    assert "absent" in result.failed[ABSENT] and "out of range" in result.failed[(2, 99)]
    assert_blocks_match(cluster.bank, result.blocks)


def test_corrupt_replica_gives_data_loss_and_client_fails_over(cluster):
    code, _ = raw_fetch(cluster.s0b.address, request(cluster.bank, CORRUPT))
    assert code == grpc.StatusCode.DATA_LOSS
    code, chunks = raw_fetch(cluster.s0a.address, request(cluster.bank, CORRUPT))
    assert code == grpc.StatusCode.OK
    assert b"".join(bytes(c.data) for c in chunks) == bytes(cluster.bank.read_block_bytes(CORRUPT))

    failovers = 0
    with BankClient(cluster.bank, static_addresses={"0": [cluster.s0a.address, cluster.s0b.address]}) as client:
        for _ in range(4):  # round robin puts replica b first at least once
            result = client.fetch([(1, 0), (2, 1), CORRUPT])
            assert result.failed == {}
            assert_blocks_match(cluster.bank, result.blocks)
            failovers += result.failovers
    assert failovers >= 1
    metrics_b = urllib.request.urlopen(f"http://{cluster.s0b.metrics_address}/metrics", timeout=5).read().decode()
    assert 'hiermem_bank_errors_total{code="DATA_LOSS",method="FetchBlocks"}' in metrics_b
    metrics_a = urllib.request.urlopen(f"http://{cluster.s0a.metrics_address}/metrics", timeout=5).read().decode()
    assert 'hiermem_bank_requests_total{code="OK",method="FetchBlocks"}' in metrics_a
    assert 'hiermem_bank_bytes_sent_total{level="3"}' in metrics_a


def test_kill9_of_a_replica_during_fetches(cluster):
    extra = procs.start_bank_shard(cluster.bank_a, "0", redis_url=cluster.redis.url, replica_id="c",
                                   extra_args=SHARD_ARGS)
    try:
        with BankClient(cluster.bank, redis_url=cluster.redis.url, refresh_s=0.2, attempt_timeout_s=3,
                        channel_idle_s=0.5) as client:
            deadline = time.monotonic() + 10
            while extra.address not in client.replicas().get("0", []) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert extra.address in client.replicas()["0"]
            paths = shard0_paths(cluster.bank)
            results, errors = [], []

            def fetch_loop():
                for i in range(36):
                    r = client.fetch(paths[i % len(paths)], timeout_s=10)
                    results.append(r)
                    if r.failed:
                        errors.append(r.failed)

            worker = threading.Thread(target=fetch_loop)
            worker.start()
            while len(results) < 6 and worker.is_alive():
                time.sleep(0.01)
            extra.kill9()
            worker.join(60)
            # Its registration expires (TTL 2 s); then the client drops it and closes the idle channel.
            deadline = time.monotonic() + 10
            while extra.address in client.replica_set.channel_addresses() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert extra.address not in client.replicas()["0"]
            assert extra.address not in client.replica_set.channel_addresses()
        assert not worker.is_alive()
        assert errors == [] and len(results) == 36
        assert sum(r.failovers for r in results) >= 1  # replica c was asked after its death, and skipped
        for r in results[::6]:
            assert_blocks_match(cluster.bank, r.blocks)
    finally:
        extra.kill9()


def test_redis_down_clients_keep_fetching_and_replicas_reregister(cluster):
    refs = path_refs((1, 5, 22)) + path_refs((2, 9, 37))
    keys = redis.Redis.from_url(cluster.redis.url)
    with BankClient(cluster.bank, redis_url=cluster.redis.url, refresh_s=0.2) as client:
        assert client.fetch(refs).failed == {}
        cluster.redis.stop()
        try:
            assert client.refresh() is False
            time.sleep(0.6)  # a few failed refreshes and heartbeats
            result = client.fetch(refs)
            assert result.failed == {}
            assert_blocks_match(cluster.bank, result.blocks)
            assert procs.health_status(cluster.s0a.address) == "SERVING"
        finally:
            cluster.redis.start()
        want = {f"{s}:{r}" for s, r in (("0", "a"), ("0", "b"), ("1", "a"))}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = {k.decode().split(":replica:")[1] for k in keys.keys(replica_pattern(cluster.bank.bank_id))}
            if want <= got:
                break
            time.sleep(0.1)
        assert want <= got, f"replicas did not re-register after Redis came back: {got}"
        assert client.refresh() is True
        assert client.fetch(refs).failed == {}
    keys.close()


def test_sigterm_finishes_the_inflight_stream_then_exits(cluster):
    proc = procs.start_bank_shard(cluster.bank_a, "1", redis_url=cluster.redis.url, replica_id="d",
                                  extra_args=[*SHARD_ARGS, "--chunk-bytes", "16384", "--drain-delay-s", "1"])
    keys = redis.Redis.from_url(cluster.redis.url)
    key = f"hiermem:bank:{cluster.bank.bank_id}:replica:1:d"
    try:
        assert procs.wait_for_health(proc.address)
        assert keys.exists(key)
        refs = [(1, 2), (1, 3), *[(2, i) for i in range(8, 16)], *[(3, i) for i in range(32, 62)]]
        want = b"".join(bytes(cluster.bank.read_block_bytes(r)) for r in refs)
        with grpc.insecure_channel(proc.address) as channel:
            call = channel.unary_stream(FETCH, request_serializer=pb.FetchBlocksRequest.SerializeToString,
                                        response_deserializer=wire.decode_chunk)
            stream = call(request(cluster.bank, *refs), timeout=30)
            got = [bytes(next(stream).data)]
            proc.signal(signal.SIGTERM)
            # Draining: health says NOT_SERVING and the registration is gone while the stream goes on.
            assert procs.wait_for_health(proc.address, want="NOT_SERVING", timeout=5)
            assert not keys.exists(key)
            for i, chunk in enumerate(stream):
                got.append(bytes(chunk.data))
                if i < 40:
                    time.sleep(0.01)
        assert b"".join(got) == want
        assert proc.popen.wait(20) == 0
        assert "draining" in proc.output(200)
    finally:
        proc.kill9()
        keys.close()
