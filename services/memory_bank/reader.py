"""Reads and checksums a memory-mapped block in a worker thread, ahead of the socket."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import crc32c


class BlockReader:
    """Starts reading `view` (a block in a mapped file) at once: a worker thread computes the block's
    crc32c chunk by chunk, which faults its pages in from disk, and announces each chunk as it is done.
    Several readers run at once (the current block and the next ones), so disk reads overlap each other
    and the sending. Must be created on the event loop that consumes it."""

    def __init__(self, view: memoryview, chunk_bytes: int) -> None:
        self.view = view
        self.step = chunk_bytes
        self.offsets = list(range(0, len(view), chunk_bytes))
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Queue[int] = asyncio.Queue()
        self._stop = threading.Event()
        self._worker = self._loop.run_in_executor(None, self._checksum)
        self._worker.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"

    def _checksum(self) -> int:
        crc = 0
        for offset in self.offsets:
            if self._stop.is_set():
                break
            # crc32c touches every page (faulting it in from disk) and releases the GIL while it runs.
            crc = crc32c.crc32c(self.view[offset:offset + self.step], crc)
            self._loop.call_soon_threadsafe(self._ready.put_nowait, offset)
        return crc

    async def chunks(self, crc_want: int, corrupt: Callable[[int], Exception]
                     ) -> AsyncIterator[tuple[int, memoryview]]:
        """(offset, bytes) of every chunk as soon as it has been read. The last chunk is held back until
        the whole block's crc32c equals `crc_want`; otherwise `corrupt(actual_crc)` is raised instead, so a
        corrupt block never reaches a client whole."""
        try:
            for i in range(len(self.offsets)):
                if self._ready.empty():
                    getter = asyncio.ensure_future(self._ready.get())
                    await asyncio.wait({getter, self._worker}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # the worker failed before delivering this chunk
                        getter.cancel()
                        self._worker.result()
                    offset = getter.result()
                else:
                    offset = self._ready.get_nowait()
                if i == len(self.offsets) - 1:
                    crc = await self._worker
                    if crc != crc_want:
                        raise corrupt(crc)
                yield offset, self.view[offset:offset + self.step]
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stops the worker after its current chunk (for a stream that ends early)."""
        self._stop.set()
