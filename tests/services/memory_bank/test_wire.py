"""Hand-made BlockChunk encoding is byte-identical to protobuf's, and decodes what protobuf encodes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.memory_bank import wire
from services.memory_bank._gen import memory_bank_pb2 as pb

headers = st.none() | st.builds(
    lambda lv, ix, shape, dt, n, crc, bid: pb.BlockHeader(
        node=pb.NodeRef(level=lv, index=ix), shape=shape, dtype=dt, nbytes=n, crc32c=crc, bank_id=bid),
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.lists(st.integers(0, 2**32 - 1), max_size=4),
    st.sampled_from(["float16", "bfloat16", "float32", ""]), st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1), st.text(max_size=70))


@settings(max_examples=200, deadline=None)
@given(header=headers, offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=3000))
def test_encode_matches_protobuf_and_decodes_back(header, offset, data):
    reference = pb.BlockChunk(offset=offset, data=data)
    if header is not None:
        reference.header.CopyFrom(header)
    encoded = wire.encode_chunk(None if header is None else header.SerializeToString(), offset, memoryview(data))
    assert encoded == reference.SerializeToString()
    chunk = wire.decode_chunk(reference.SerializeToString())
    assert chunk.offset == offset and bytes(chunk.data) == data
    assert chunk.header == header


def test_decode_skips_unknown_fields_and_rejects_truncation():
    raw = pb.BlockChunk(offset=5, data=b"abc").SerializeToString()
    unknown = bytes([0x20, 0x07, 0x2D, 1, 2, 3, 4])  # field 4 varint, field 5 fixed32
    chunk = wire.decode_chunk(unknown + raw)
    assert (chunk.offset, bytes(chunk.data)) == (5, b"abc")
    with pytest.raises(ValueError):
        wire.decode_chunk(raw[:-1])


def test_serialize_response_passes_bytes_and_serializes_messages():
    msg = pb.BlockChunk(offset=1, data=b"x")
    assert wire.serialize_response(msg) == msg.SerializeToString()
    assert wire.serialize_response(b"raw") == b"raw"
