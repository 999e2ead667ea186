from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeRef(_message.Message):
    __slots__ = ("level", "index")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    level: int
    index: int
    def __init__(self, level: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("bank_id", "spec_json", "shard_id", "replica_id", "owned", "max_nodes_per_call", "max_bytes_per_call", "chunk_bytes", "anchor_arch", "anchor_hash")
    BANK_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_ARCH_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_HASH_FIELD_NUMBER: _ClassVar[int]
    bank_id: str
    spec_json: str
    shard_id: str
    replica_id: str
    owned: _containers.RepeatedCompositeFieldContainer[NodeRef]
    max_nodes_per_call: int
    max_bytes_per_call: int
    chunk_bytes: int
    anchor_arch: str
    anchor_hash: str
    def __init__(self, bank_id: _Optional[str] = ..., spec_json: _Optional[str] = ..., shard_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., owned: _Optional[_Iterable[_Union[NodeRef, _Mapping]]] = ..., max_nodes_per_call: _Optional[int] = ..., max_bytes_per_call: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., anchor_arch: _Optional[str] = ..., anchor_hash: _Optional[str] = ...) -> None: ...

class FetchBlocksRequest(_message.Message):
    __slots__ = ("bank_id", "nodes")
    BANK_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    bank_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRef]
    def __init__(self, bank_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeRef, _Mapping]]] = ...) -> None: ...

class BlockHeader(_message.Message):
    __slots__ = ("node", "shape", "dtype", "nbytes", "crc32c", "bank_id")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    BANK_ID_FIELD_NUMBER: _ClassVar[int]
    node: NodeRef
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    nbytes: int
    crc32c: int
    bank_id: str
    def __init__(self, node: _Optional[_Union[NodeRef, _Mapping]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., nbytes: _Optional[int] = ..., crc32c: _Optional[int] = ..., bank_id: _Optional[str] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
