"""The MemoryBank servicer: wire <-> memory_store.Bank for one shard, and nothing else.

Errors are raised as exceptions (memory_store's or ours) and turned into status codes by the interceptor.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import crc32c
import grpc
from google.protobuf.message import DecodeError

from memory_store import NodeRef
from memory_store.errors import BankError, BankMismatch, BlockCorrupt, InvalidSpec

from . import errors, metrics, wire
from ._gen import memory_bank_pb2 as pb
from .cache import HotCache
from .reader import BlockReader
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
        # Map this shard's files now: whatever later happens to the bank's paths (a new version, a
        # re-pointed `current`), this replica serves exactly the version it started with.
        pin = getattr(bank, "pin_shard", None)
        if pin is not None:
            pin(shard_id)
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
        readers: dict[int, BlockReader] = {}  # blocks being read ahead, by position in `refs`
        try:
            for i, ref in enumerate(refs):
                # Checked per block, not up front: NOT_FOUND then always concerns the first block not yet
                # sent, so a client knows which node is missing and keeps the blocks it already has.
                if not self._owns(ref):
                    raise errors.NotInShard(f"node {ref} is not in shard {self.shard_id}")
                info = self.bank.block_info(ref)
                header = pb.BlockHeader(
                    node=pb.NodeRef(level=ref.level, index=ref.index), shape=list(info.shape),
                    dtype=self.spec.dtype, nbytes=info.nbytes, crc32c=info.crc32c, bank_id=self.bank.bank_id,
                ).SerializeToString()
                # This block's reader first, then the next ones', so its disk reads are queued first;
                # a block that cannot be read gets no reader and raises in _block_chunks.
                for j in range(i, min(len(refs), i + 1 + self.settings.prefetch_blocks)):
                    if j not in readers:
                        self._prefetch(refs[j], j, readers)
                chunks = self._block_chunks(ref, info, readers.pop(i, None))
                async for offset, piece in chunks:
                    remaining = context.time_remaining()
                    if remaining is not None and remaining <= 0:
                        raise errors.DeadlineExpired(f"deadline passed while streaming node {ref}")
                    yield wire.encode_chunk(header if offset == 0 else None, offset, piece)
                metrics.BYTES_SENT.labels(str(ref.level)).inc(info.nbytes)
                metrics.BLOCKS_SENT.labels(str(ref.level)).inc()
        finally:
            for reader in readers.values():
                reader.cancel()

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

    def _prefetch(self, ref: NodeRef, position: int, readers: dict[int, BlockReader]) -> None:
        """Starts reading a later block of the request, unless the hot cache has it or it cannot be read
        (its error is raised when its turn comes)."""
        try:
            info = self.bank.block_info(ref)
            if self.cache.cacheable(ref.level, info.nbytes) and self.cache.peek(ref):
                return
            if self._owns(ref):
                view = self.bank.read_block_bytes(ref, verify=False, shard=self.shard_id)
                readers[position] = BlockReader(view, self.settings.chunk_bytes)
        except BankError:
            return

    async def _block_chunks(self, ref: NodeRef, info, reader: BlockReader | None
                            ) -> AsyncIterator[tuple[int, memoryview]]:
        """(offset, bytes) of a block's chunks: from the hot cache (verified when cached), or from the
        mapped file through a BlockReader (given if prefetched); fills the hot cache on the way."""
        cacheable = self.cache.cacheable(ref.level, info.nbytes)
        hit = self.cache.get(ref, ref.level) if cacheable else None
        step = self.settings.chunk_bytes
        if hit is not None:
            if reader is not None:
                reader.cancel()
            view = memoryview(hit)
            for offset in range(0, len(view), step):
                yield offset, view[offset:offset + step]
            return
        if reader is None:
            reader = BlockReader(self.bank.read_block_bytes(ref, verify=False, shard=self.shard_id), step)

        def corrupt(actual: int) -> BlockCorrupt:
            return BlockCorrupt(f"block {ref} of shard {self.shard_id}: crc32c {actual:#010x} != "
                                f"{info.crc32c:#010x} in the manifest")

        async for offset, piece in reader.chunks(info.crc32c, corrupt):
            yield offset, piece
        if cacheable:
            self.cache.put(ref, bytes(reader.view))


def method_handlers(servicer: MemoryBankServicer) -> grpc.GenericRpcHandler:
    """The service's handlers, registered by hand (scripts/gen_proto.sh makes no service stubs): FetchBlocks
    sends pre-encoded chunks and both RPCs parse requests leniently, which generated stubs cannot."""
    handlers = {
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo, request_deserializer=lenient_deserializer(pb.GetInfoRequest),
            response_serializer=pb.GetInfoResponse.SerializeToString),
        "FetchBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.FetchBlocks, request_deserializer=lenient_deserializer(pb.FetchBlocksRequest),
            response_serializer=wire.serialize_response),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
