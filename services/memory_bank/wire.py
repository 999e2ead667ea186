"""BlockChunk on the wire without the extra copies of the protobuf runtime.

The generated `BlockChunk` would copy a block's bytes three times on the server (mmap -> bytes -> message
arena -> serialized string) and twice on the client (string -> arena -> `.data` bytes). A chunk is a tiny
message, so we encode and decode it by hand, byte-compatible with `memory_bank.proto` (tests check both
directions against the generated class): the server joins a small prefix with a memoryview of the mmap
(one copy, the one grpc needs anyway) and the client slices the received bytes (no copy).

    BlockChunk = [0x0A len BlockHeader]? [0x10 varint offset]? [0x1A len data]?
"""

from __future__ import annotations

from dataclasses import dataclass

from ._gen import memory_bank_pb2 as pb

_TAG_HEADER = 0x0A  # field 1, length-delimited
_TAG_OFFSET = 0x10  # field 2, varint
_TAG_DATA = 0x1A  # field 3, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def encode_chunk(header: bytes | None, offset: int, data: memoryview | bytes) -> bytes:
    """Serialized `BlockChunk(header=..., offset=offset, data=data)`; `header` is a serialized
    `BlockHeader` (or None). The only copy of `data` is the join into the returned bytes."""
    parts: list[bytes | memoryview] = []
    if header is not None:
        parts += [bytes((_TAG_HEADER,)), _varint(len(header)), header]
    if offset:
        parts += [bytes((_TAG_OFFSET,)), _varint(offset)]
    if len(data):
        parts += [bytes((_TAG_DATA,)), _varint(len(data)), data]
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded BlockChunk: `data` is a view of the received message, not a copy."""

    header: pb.BlockHeader | None
    offset: int
    data: memoryview


def decode_chunk(raw: bytes) -> Chunk:
    """Parses a serialized BlockChunk (any field order, unknown fields skipped, like protobuf does)."""
    buf = memoryview(raw)
    pos, header, offset, data = 0, None, 0, buf[0:0]
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if field == 2:
                offset = value
        elif wire_type == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            if field == 1:
                header = pb.BlockHeader.FromString(buf[pos:pos + n].tobytes())
            elif field == 3:
                data = buf[pos:pos + n]
            pos += n
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if pos != len(buf):
        raise ValueError("truncated fixed-width field")
    return Chunk(header, offset, data)


def serialize_response(message: bytes | pb.BlockChunk) -> bytes:
    """Response serializer of FetchBlocks: pre-encoded chunks pass through, messages are serialized."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()
