"""The safetensors file format, written streaming and read through mmap without copies.

`safetensors.numpy.save_file` wants every tensor in memory at once; a 9 GB bank must be written with far
less RAM, so shard files are written here: the header (8-byte little-endian length, JSON with each
tensor's dtype, shape and byte range, padded with spaces to 8 bytes) is computed up front from the layout,
then blocks are written at their offsets one by one. The result is a plain safetensors file (tests check
it with `safetensors.safe_open`). Reading parses the same header and slices an `mmap` of the file, which
`safe_open` cannot do without materialising a tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from memory_store.errors import BankError

_CRC_CHUNK = 4 << 20


def crc32c(buf, crc: int = 0) -> int:
    """crc32c of any buffer. google_crc32c only takes `bytes`, so large buffers go through it in 4 MiB
    copies (bounded memory, cache-friendly) instead of one copy of the whole buffer. `crc` continues a
    previous value."""
    mv = memoryview(buf).cast("B")
    for s in range(0, len(mv), _CRC_CHUNK):
        crc = google_crc32c.extend(crc, mv[s:s + _CRC_CHUNK].tobytes())
    return crc


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors tag: F32, F16, BF16
    shape: tuple[int, ...]
    nbytes: int


def plan_header(entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None
                ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) and each tensor's absolute [start, end) in the file."""
    body: dict[str, object] = {}
    if metadata:
        body["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    rel: dict[str, tuple[int, int]] = {}
    for e in entries:
        body[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        rel[e.name] = (offset, offset + e.nbytes)
        offset += e.nbytes
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return head, {k: (a + len(head), b + len(head)) for k, (a, b) in rel.items()}


class StreamingFile:
    """A safetensors file whose tensors are written one by one, in any order, at planned offsets."""

    def __init__(self, path: Path, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None):
        self.path = path
        head, self.ranges = plan_header(entries, metadata)
        self.header = head
        self.size = len(head) + sum(e.nbytes for e in entries)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.size)  # sparse until written
        os.pwrite(self.fd, head, 0)

    def write(self, name: str, data) -> None:
        start, end = self.ranges[name]
        mv = memoryview(data).cast("B")
        if len(mv) != end - start:
            raise BankError(f"{self.path.name}:{name}: {len(mv)} bytes given, {end - start} expected")
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], start + done)

    def close(self, sync: bool = True) -> None:
        if self.fd >= 0:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def write_file(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes | memoryview]],
               metadata: dict[str, str] | None = None) -> None:
    """Write small tensors given as name -> (dtype tag, shape, bytes), fsynced."""
    entries = [TensorEntry(n, dt, tuple(shape), memoryview(b).nbytes) for n, (dt, shape, b) in tensors.items()]
    f = StreamingFile(path, entries, metadata)
    try:
        for n, (_, _, b) in tensors.items():
            f.write(n, b)
    finally:
        f.close()


class MappedFile:
    """A safetensors file, memory-mapped read-only; `view(name)` is a zero-copy memoryview of a tensor."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, ValueError) as exc:
                raise BankError(f"{path}: not a safetensors file ({exc})") from exc
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        if self.data_start + max((e["data_offsets"][1] for e in header.values()), default=0) > len(self.mm):
            raise BankError(f"{path}: truncated (header promises more bytes than the file holds)")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def view(self, name: str, willneed: bool = False) -> memoryview:
        """Zero-copy view of one tensor's bytes. `willneed` asks the kernel to read the whole range ahead
        (madvise MADV_WILLNEED): cold level-2 reads take well under half the time (docs/memory_store.md,
        reading blocks); it costs nothing when the pages are already cached."""
        start, end = self.entries[name]["data_offsets"]
        start, end = self.data_start + start, self.data_start + end
        if willneed and end > start:
            page = start - start % mmap.PAGESIZE
            self.mm.madvise(mmap.MADV_WILLNEED, page, end - page)
        return memoryview(self.mm)[start:end]

    def release(self) -> None:
        """Drop this process's page-table entries for the whole file (MADV_DONTNEED). The mapping is a
        shared read-only file mapping, so live views stay valid: a later access faults the page back in
        from the page cache. This is what keeps RSS bounded when many blocks are read over time."""
        if len(self.mm):
            self.mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # views still exported; the mapping goes when they do
