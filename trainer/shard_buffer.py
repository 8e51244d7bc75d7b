"""One shard's bytes in memory, in a buffer the worker keeps for a later shard.

Why: a data worker reads every shard whole (it is verified before any sample is used). Read into
a ``SpooledTemporaryFile`` (an ``io.BytesIO`` that grows as it is written, freed when closed),
each 58 MB shard cost 69 ms on the CPU machine, most of it reallocating and page-faulting fresh
memory; read into a bytearray kept from the shard before, 29 ms. For a delta-rice sample that is
about 5 of the worker's 23 CPU ms (``bench/bench_input.py``).

A :class:`ShardBuffer` is a seekable binary file over that bytearray: ``shards.remote.fetch_file``
writes into it (and rewinds it when a transfer restarts), ``tarfile`` reads it, and closing it
hands it back to whoever lent it (:class:`BufferPool`) instead of freeing the memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO

READ_BYTES = 1 << 20


class ShardBuffer:
    """A binary file held in a reusable bytearray (the subset of ``io`` that fetch and tar use).

    Args:
        release: called with the buffer when it is closed (``BufferPool`` takes it back).
    """

    def __init__(self, release: Callable[[ShardBuffer], None] | None = None):
        self._data = bytearray()
        self._view = memoryview(self._data)
        self._size = 0
        self._position = 0
        self._release = release
        self.closed = True

    @property
    def capacity(self) -> int:
        return len(self._data)

    def open(self, capacity: int) -> ShardBuffer:
        """Empty the buffer for a new file of about ``capacity`` bytes (grown once if needed)."""
        if not self.closed:
            raise RuntimeError("a ShardBuffer was opened again before it was closed")
        self._reserve(capacity)
        self._size = self._position = 0
        self.closed = False
        return self

    def _reserve(self, capacity: int) -> None:
        if capacity > len(self._data):
            self._view.release()  # a bytearray with a live view cannot be resized
            self._data.extend(bytes(capacity - len(self._data)))
            self._view = memoryview(self._data)

    def fill(self, handle: BinaryIO, digest: hashlib._Hash) -> None:
        """Read ``handle`` to its end at the current position, hashing what arrives into ``digest``."""
        while True:
            if self._position == len(self._data):
                extra = handle.read(1)  # full: grow only if the file goes on
                if not extra:
                    return
                self._reserve(self._position + READ_BYTES)
                digest.update(extra)
                self.write(extra)
                continue
            end = min(len(self._data), self._position + READ_BYTES)
            count = handle.readinto(self._view[self._position : end])  # type: ignore[attr-defined]
            if not count:
                return
            digest.update(self._view[self._position : self._position + count])
            self._position += count
            self._size = max(self._size, self._position)

    def write(self, data: bytes | memoryview) -> int:
        end = self._position + len(data)
        self._reserve(end)
        self._view[self._position : end] = data
        self._position = end
        self._size = max(self._size, end)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        data = bytes(self._view[self._position : end]) if end > self._position else b""
        self._position = max(self._position, end)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self._size)[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def truncate(self, size: int | None = None) -> int:
        self._size = min(self._size, self._position if size is None else size)
        return self._size

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Done with this file: the memory goes back to the pool (or is kept for ``open``)."""
        if self.closed:
            return
        self.closed = True
        self.release()

    def release(self) -> None:
        """Hand the (closed) buffer back to the pool that lent it, e.g. when it was not used."""
        if not self.closed:
            raise RuntimeError("a ShardBuffer was released while open; close it instead")
        if self._release is not None:
            self._release(self)

    def __enter__(self) -> ShardBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BufferPool:
    """Shard buffers lent out one per shard in flight and taken back when the shard is closed.

    A worker with fetch-ahead holds two shards at a time (the one it reads, the one arriving),
    so two buffers serve it for good (four with photo shards); a caller that holds more simply
    gets more. The last buffer released is lent first, so a shard and its photo shard, lent and
    released in the same order each time, keep reusing buffers of their own sizes.
    """

    def __init__(self) -> None:
        self._free: list[ShardBuffer] = []

    def lend(self) -> ShardBuffer:
        # list.pop and list.append are atomic, and a buffer is released from the fetch thread
        # when a fetch fails.
        try:
            return self._free.pop()
        except IndexError:
            return ShardBuffer(release=self._free.append)
