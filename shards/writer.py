"""Deterministic, atomic WebDataset tar writing.

A shard is written under a hidden temporary name, fsynced and renamed, so a reader (or the
data service) never sees a partial shard under its final name. Every member has a fixed
mtime, owner and mode, and members are written in a fixed order, so the same samples give
the same bytes; the sha256 is computed while writing, in the same pass.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from shards.manifest import fsync_dir

MEMBER_MTIME = 1_500_000_000  # a fixed date (2017) instead of the ingest time, for identical bytes
MEMBER_MODE = 0o444
COPY_BUFFER = 1 << 22  # tarfile copies members in 16 KiB pieces by default: a Python call per piece


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, handle):
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self.size


def temp_name(final: Path) -> Path:
    """The name a shard has while it is written: hidden, and never listed in a manifest."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


class ShardWriter:
    """Writes one tar shard atomically; use as a context manager.

    Example::

        with ShardWriter(path) as shard:
            shard.add("E057/021897/400002", {"photo.png": data, ...})
        shard.size, shard.sha256  # after a clean exit the file is published under ``path``
    """

    def __init__(self, final: Path):
        self.final = final
        self.temp = temp_name(final)
        self.size = 0
        self.sha256 = ""
        self.num_samples = 0

    def __enter__(self) -> ShardWriter:
        self._handle = open(self.temp, "wb")
        self._hashing = _HashingFile(self._handle)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_BUFFER)
        return self

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; members are written in the order given (keep it fixed)."""
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = MEMBER_MTIME
            info.mode = MEMBER_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def __exit__(self, kind, value, traceback) -> None:
        try:
            try:
                self._tar.close()
                self._handle.flush()
                if kind is None:
                    os.fsync(self._handle.fileno())
            finally:
                self._handle.close()
        except BaseException:
            # Closing writes the end blocks and flushes: on a full disk it fails as well. The
            # temp file must go either way, or a failed ingest keeps the space it could not use.
            self.temp.unlink(missing_ok=True)
            if kind is None:
                raise
            return  # the body's own error propagates
        if kind is not None:
            self.temp.unlink(missing_ok=True)
            return
        self.size = self._hashing.size
        self.sha256 = self._hashing.digest.hexdigest()
        os.replace(self.temp, self.final)
        fsync_dir(self.final.parent)
