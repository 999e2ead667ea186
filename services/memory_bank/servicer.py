"""The MemoryBank servicer: wire <-> memory_store.Bank for one shard, and nothing else.

Errors are raised as exceptions (memory_store's or ours) and turned into status codes by the interceptor.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import crc32c
import grpc
from google.protobuf.message import DecodeError

from memory_store import NodeRef
from memory_store.errors import BankMismatch, BlockCorrupt, InvalidSpec

from . import errors, metrics, wire
from ._gen import memory_bank_pb2 as pb
from .cache import HotCache
from .settings import BankServerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryBank"].full_name  # "hiermem.v1.MemoryBank"


@dataclass(frozen=True)
class Malformed:
    """What the lenient request deserializer returns for bytes that are not a valid message."""

    reason: str


def lenient_deserializer(message_cls):
    """Deserializer that hands undecodable bytes to the servicer (-> INVALID_ARGUMENT) instead of letting
    grpc answer INTERNAL."""

    def parse(raw: bytes):
        try:
            return message_cls.FromString(raw)
        except DecodeError as exc:
            return Malformed(str(exc))

    return parse


class MemoryBankServicer:
    """Serves the blocks of one shard of `bank` (a `memory_store.Bank`).

    Blocks are read from the bank's memory-mapped shard files; crc32c is checked here on every read (the
    `crc32c` package hashes a memoryview in place), and the verified bytes go to the socket in chunks that
    are views of the mapping, copied once into the outgoing message."""

    def __init__(self, bank, shard_id: str, replica_id: str, settings: BankServerSettings) -> None:
        if shard_id not in bank.shard_ids:
            raise errors.NotInShard(f"bank {bank.bank_id} has no shard {shard_id!r} (has {bank.shard_ids})")
        self.bank = bank
        self.spec = bank.spec
        self.shard_id = shard_id
        self.replica_id = replica_id
        self.settings = settings
        self.owned: list[NodeRef] = [NodeRef(int(r[0]), int(r[1])) for r in bank.owned_subtrees(shard_id)]
        self.cache = HotCache(settings.hot_cache_bytes, settings.hot_cache_max_level)

    # --- RPCs -------------------------------------------------------------------------------------------

    async def GetInfo(self, request, context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        """Describes the bank and this shard replica."""
        anchor = self.bank.anchor
        return pb.GetInfoResponse(
            bank_id=self.bank.bank_id, spec_json=self.spec.model_dump_json(), shard_id=self.shard_id,
            replica_id=self.replica_id, owned=[pb.NodeRef(level=r.level, index=r.index) for r in self.owned],
            max_nodes_per_call=self.settings.max_nodes_per_call,
            max_bytes_per_call=self.settings.max_bytes_per_call, chunk_bytes=self.settings.chunk_bytes,
            anchor_arch=getattr(anchor, "arch", "") or "", anchor_hash=getattr(anchor, "hash", "") or "")

    async def FetchBlocks(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Streams the requested blocks as pre-encoded BlockChunk messages (see wire.py)."""
        refs = self._validate(request)
        for ref in refs:
            # Checked per block, not up front: NOT_FOUND then always concerns the first block not yet sent,
            # so a client knows which node is missing and keeps the blocks it already has.
            if not self._owns(ref):
                raise errors.NotInShard(f"node {ref} is not in shard {self.shard_id}")
            info = self.bank.block_info(ref)
            header = pb.BlockHeader(
                node=pb.NodeRef(level=ref.level, index=ref.index), shape=list(info.shape),
                dtype=self.spec.dtype, nbytes=info.nbytes, crc32c=info.crc32c, bank_id=self.bank.bank_id,
            ).SerializeToString()
            async for offset, piece in self._block_chunks(ref, info):
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise errors.DeadlineExpired(f"deadline passed while streaming node {ref}")
                yield wire.encode_chunk(header if offset == 0 else None, offset, piece)
            metrics.BYTES_SENT.labels(str(ref.level)).inc(info.nbytes)
            metrics.BLOCKS_SENT.labels(str(ref.level)).inc()

    def preload_hot_cache(self) -> int:
        """Reads and verifies this shard's blocks of the cached levels, shallowest first, until the hot
        cache is full; returns the number of blocks loaded. Runs in a thread at start-up."""
        loaded = 0
        for level in range(1, min(self.cache.max_level, self.spec.depth) + 1):
            nbytes = self.spec.bytes_per_block(level)
            for index in range(self.spec.nodes_at(level)):
                ref = NodeRef(level, index)
                if self.cache.nbytes + nbytes > self.cache.max_bytes:
                    return loaded
                if not self._owns(ref) or not self.bank.is_present(ref):
                    continue
                data = self.bank.read_block_bytes(ref, verify=False, shard=self.shard_id)
                if crc32c.crc32c(data) != self.bank.block_info(ref).crc32c:
                    log.error("not caching corrupt block %s of shard %s", ref, self.shard_id)
                    continue
                self.cache.put(ref, bytes(data))
                loaded += 1
        return loaded

    # --- helpers ----------------------------------------------------------------------------------------

    def _validate(self, request) -> list[NodeRef]:
        """Checks a request before anything is streamed; returns its refs in order."""
        if isinstance(request, Malformed):
            raise errors.InvalidRequest(f"undecodable FetchBlocksRequest: {request.reason}")
        if not request.bank_id:
            raise errors.InvalidRequest("bank_id is required")
        if request.bank_id != self.bank.bank_id:
            raise BankMismatch(f"this server serves bank {self.bank.bank_id}, the request is for "
                               f"{request.bank_id}")
        if not request.nodes:
            raise errors.InvalidRequest("no nodes requested")
        if len(request.nodes) > self.settings.max_nodes_per_call:
            raise errors.LimitExceeded(f"{len(request.nodes)} nodes requested, at most "
                                       f"{self.settings.max_nodes_per_call} per call")
        refs: list[NodeRef] = []
        seen: set[NodeRef] = set()
        total = 0
        for node in request.nodes:
            try:
                ref = self.spec.check_ref(NodeRef(node.level, node.index))
            except InvalidSpec as exc:
                raise errors.InvalidRequest(str(exc)) from exc
            if ref in seen:
                raise errors.InvalidRequest(f"node {ref} requested twice")
            seen.add(ref)
            total += self.spec.bytes_per_block(ref.level)
            refs.append(ref)
        if total > self.settings.max_bytes_per_call:
            raise errors.LimitExceeded(f"{total} bytes requested, at most {self.settings.max_bytes_per_call} "
                                       "per call")
        return refs

    def _owns(self, ref: NodeRef) -> bool:
        # Nodes above the shard level are stored in every shard that owns a subtree below them.
        return self.shard_id in self.bank.shards_of(ref)

    async def _block_chunks(self, ref: NodeRef, info) -> AsyncIterator[tuple[int, memoryview]]:
        """(offset, bytes) of a block's chunks: from the hot cache (verified when cached), or from the
        mapped file through `_verified_chunks`; fills the hot cache on the way."""
        cacheable = self.cache.cacheable(ref.level, info.nbytes)
        hit = self.cache.get(ref, ref.level) if cacheable else None
        step = self.settings.chunk_bytes
        if hit is not None:
            view = memoryview(hit)
            for offset in range(0, len(view), step):
                yield offset, view[offset:offset + step]
            return
        view = self.bank.read_block_bytes(ref, verify=False, shard=self.shard_id)
        async for offset, piece in self._verified_chunks(ref, view, info.crc32c):
            yield offset, piece
        if cacheable:
            self.cache.put(ref, bytes(view))

    async def _verified_chunks(self, ref: NodeRef, view: memoryview,
                               crc_want: int) -> AsyncIterator[tuple[int, memoryview]]:
        """Chunks of a mapped block, read and checksummed by a worker thread ahead of the socket, so disk
        reads (page faults) overlap sending; one thread hand-off per block, one loop wake-up per chunk.
        The last chunk is held back until the whole block's crc32c matches: a corrupt block never reaches
        a client whole (DATA_LOSS instead)."""
        step = self.settings.chunk_bytes
        offsets = list(range(0, len(view), step))
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[int] = asyncio.Queue()
        stop = threading.Event()

        def checksum() -> int:
            crc = 0
            for offset in offsets:
                if stop.is_set():
                    break
                # crc32c touches every page (faulting it in from disk) and releases the GIL while it runs.
                crc = crc32c.crc32c(view[offset:offset + step], crc)
                loop.call_soon_threadsafe(ready.put_nowait, offset)
            return crc

        worker = loop.run_in_executor(None, checksum)
        try:
            for i in range(len(offsets)):
                if ready.empty():
                    getter = asyncio.ensure_future(ready.get())
                    await asyncio.wait({getter, worker}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # the worker failed before delivering this chunk
                        getter.cancel()
                        worker.result()
                    offset = getter.result()
                else:
                    offset = ready.get_nowait()
                if i == len(offsets) - 1:
                    crc = await worker
                    if crc != crc_want:
                        raise BlockCorrupt(f"block {ref} of shard {self.shard_id}: crc32c {crc:#010x} != "
                                           f"{crc_want:#010x} in the manifest")
                yield offset, view[offset:offset + step]
        finally:
            stop.set()


def method_handlers(servicer: MemoryBankServicer) -> grpc.GenericRpcHandler:
    """The service's handlers, as the generated `add_MemoryBankServicer_to_server` would register them,
    except that FetchBlocks sends pre-encoded chunks and both RPCs parse requests leniently."""
    handlers = {
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo, request_deserializer=lenient_deserializer(pb.GetInfoRequest),
            response_serializer=pb.GetInfoResponse.SerializeToString),
        "FetchBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.FetchBlocks, request_deserializer=lenient_deserializer(pb.FetchBlocksRequest),
            response_serializer=wire.serialize_response),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
