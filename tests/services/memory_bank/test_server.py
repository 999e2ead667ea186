"""The shard server in-process over real gRPC: info, chunking, hot cache, limits, error boundary, deadlines."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from prometheus_client import REGISTRY

from memory_store import NodeRef
from services.memory_bank import errors, wire
from services.memory_bank._gen import memory_bank_pb2 as pb
from services.memory_bank.servicer import Malformed

from .conftest import running_shards

FETCH = "/hiermem.v1.MemoryBank/FetchBlocks"


def fetch_stream(address, bank_id, refs, timeout=10.0):
    """One raw FetchBlocks call: (status code, details, the chunks received before it ended)."""
    req = pb.FetchBlocksRequest(bank_id=bank_id, nodes=[pb.NodeRef(level=lv, index=ix) for lv, ix in refs])
    received = []
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream(FETCH, request_serializer=pb.FetchBlocksRequest.SerializeToString,
                               response_deserializer=wire.decode_chunk)
        try:
            for chunk in call(req, timeout=timeout):
                received.append(chunk)
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), received
    return grpc.StatusCode.OK, None, received


def fetch_raw(address, bank_id, refs, timeout=10.0):
    code, details, received = fetch_stream(address, bank_id, refs, timeout)
    return (code, received) if code == grpc.StatusCode.OK else (code, details)


def test_get_info(shards, bank):
    addresses, _ = shards
    with grpc.insecure_channel(addresses["1"]) as ch:
        info = ch.unary_unary("/hiermem.v1.MemoryBank/GetInfo",
                              request_serializer=pb.GetInfoRequest.SerializeToString,
                              response_deserializer=pb.GetInfoResponse.FromString)(pb.GetInfoRequest(), timeout=5)
    assert (info.bank_id, info.shard_id) == (bank.bank_id, "1")
    assert [(n.level, n.index) for n in info.owned] == [(1, 2), (1, 3)]
    assert json.loads(info.spec_json)["ranks"] == [8, 4, 2]
    assert (info.chunk_bytes, info.max_nodes_per_call) == (4096, 16)
    assert (info.anchor_arch, info.anchor_hash) == ("tiny-test", "0" * 16)


def test_blocks_stream_in_chunks_with_one_header_each(shards, bank):
    addresses, _ = shards
    refs = [(1, 0), (2, 1), (3, 5)]
    code, chunks = fetch_raw(addresses["0"], bank.bank_id, refs)
    assert code == grpc.StatusCode.OK
    headers = [c for c in chunks if c.header is not None]
    assert [(h.header.node.level, h.header.node.index) for h in headers] == refs
    level1 = bank.block_info((1, 0))
    assert level1.nbytes == 12288 and sum(1 for c in chunks[:3] if len(c.data) == 4096) == 3  # 3 chunks of 4 KiB
    h = headers[0].header
    assert (tuple(h.shape), h.dtype, h.nbytes, h.crc32c, h.bank_id) == (
        level1.shape, "float16", level1.nbytes, level1.crc32c, bank.bank_id)
    blob = b"".join(bytes(c.data) for c in chunks)
    assert blob == b"".join(bytes(bank.read_block_bytes(r)) for r in refs)


def test_hot_cache_serves_shallow_levels_from_memory(shards, bank):
    addresses, servers = shards
    hits = REGISTRY.get_sample_value("hiermem_bank_cache_hits_total", {"level": "1"}) or 0.0
    for _ in range(2):
        assert fetch_raw(addresses["1"], bank.bank_id, [(1, 3), (3, 60)])[0] == grpc.StatusCode.OK
    cache = servers["1"].servicer.cache
    assert NodeRef(1, 3) in cache._entries and NodeRef(3, 60) not in cache._entries  # deep levels bypass it
    assert REGISTRY.get_sample_value("hiermem_bank_cache_hits_total", {"level": "1"}) >= hits + 1


def test_byte_limit_per_call(bank_dir, bank):
    with running_shards(bank_dir, shards=("0",), max_bytes_per_call=20000) as (addresses, _):
        code, detail = fetch_raw(addresses["0"], bank.bank_id, [(1, 0), (1, 1)])  # 2 x 12 KiB
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "bytes" in detail
        assert fetch_raw(addresses["0"], bank.bank_id, [(1, 0)])[0] == grpc.StatusCode.OK


def test_unexpected_errors_become_internal_and_are_logged(shards, bank, monkeypatch, caplog):
    addresses, servers = shards

    def broken(ref):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(servers["0"].servicer.bank, "block_info", broken)
    code, detail = fetch_raw(addresses["0"], bank.bank_id, [(2, 2)])
    assert code == grpc.StatusCode.INTERNAL and "disk on fire" not in detail
    assert any("failed unexpectedly" in r.message and r.exc_info for r in caplog.records)


class _Context:
    """Enough of a grpc.aio.ServicerContext for calling the servicer directly."""

    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_streaming_stops_when_the_deadline_has_passed(shards, bank):
    _, servers = shards
    servicer = servers["0"].servicer
    req = pb.FetchBlocksRequest(bank_id=bank.bank_id, nodes=[pb.NodeRef(level=1, index=0)])

    async def drain(ctx):
        return [c async for c in servicer.FetchBlocks(req, ctx)]

    assert len(asyncio.run(drain(_Context(None)))) == 3
    with pytest.raises(errors.DeadlineExpired):
        asyncio.run(drain(_Context(0.0)))


def test_undecodable_request_is_invalid_argument(shards):
    _, servers = shards
    with pytest.raises(errors.InvalidRequest):
        servers["0"].servicer._validate(Malformed("bad varint"))


def test_a_corrupt_block_is_never_delivered_whole(bank_dir, bank, tmp_path):
    import shutil

    from tests.integration.procs import corrupt_block

    copy = tmp_path / "bank"
    shutil.copytree(bank_dir, copy)
    corrupt_block(copy, "0", 1, 0, byte=100)  # in the first of the block's three 4 KiB chunks
    with running_shards(copy, shards=("0",), chunk_bytes=4096) as (addresses, _):
        code, _, received = fetch_stream(addresses["0"], bank.bank_id, [(2, 0), (1, 0)])
    assert code == grpc.StatusCode.DATA_LOSS
    starts = [i for i, c in enumerate(received) if c.header is not None]
    assert len(starts) == 2  # block (2, 0) whole, then part of (1, 0)
    corrupt_bytes = sum(len(c.data) for c in received[starts[1]:])
    assert 0 < corrupt_bytes < bank.block_info((1, 0)).nbytes  # the last chunk was held back


def test_hot_cache_is_preloaded_before_serving(bank_dir, bank):
    with running_shards(bank_dir, shards=("1",), hot_cache_bytes=3 * 12288) as (_, servers):
        cache = servers["1"].servicer.cache
        # room for 3 level-1 blocks, shard 1 owns two: both loaded and verified, nothing deeper
        assert set(cache._entries) == {NodeRef(1, 2), NodeRef(1, 3)}
        assert cache._entries[NodeRef(1, 3)] == bytes(bank.read_block_bytes((1, 3)))


def test_read_ahead_of_a_deleted_node_does_not_cut_the_blocks_before_it(shards, bank):
    addresses, _ = shards
    code, details, received = fetch_stream(addresses["0"], bank.bank_id, [(1, 0), (2, 1), (3, 20)])
    assert code == grpc.StatusCode.NOT_FOUND and "3:20" in details
    assert b"".join(bytes(c.data) for c in received) == b"".join(
        bytes(bank.read_block_bytes(r)) for r in [(1, 0), (2, 1)])
