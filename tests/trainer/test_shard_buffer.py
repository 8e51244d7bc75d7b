"""Shards read into reused memory (trainer/shard_buffer.py, ShardSource.open_verified): the buffer
behaves as the file it holds, and a buffer reused for the next shard never changes a sample
already taken from the shard before."""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile

import pytest

from shards.decode import ALL_FIELDS
from shards.ingest import ingest
from trainer import data
from trainer.data import ShardSource, ShardStream, Split, select_shards
from trainer.shard_buffer import BufferPool, ShardBuffer

TEX = 64  # the small entity's texture side (tests/conftest.py)


@pytest.fixture(scope="module")
def shard_folder(entity_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-buffers")
    ingest(entity_cache, root, shard_size=400_000, workers=2)
    return root / entity_cache.name


def test_a_reused_buffer_holds_exactly_the_new_file():
    """Pins the file semantics fetch and tar rely on: after a longer file, a shorter one reads
    back exactly (no tail of the old one), a rewind-and-truncate restarts it, a read past the end
    is short, and the memory is kept (no regrowth) between files."""
    buffer = ShardBuffer()
    buffer.open(10_000).write(b"x" * 10_000)
    buffer.close()
    capacity = buffer.capacity
    with buffer.open(100) as handle:
        handle.write(b"partial")
        handle.seek(0)
        handle.truncate()  # what shards.remote does when a server restarts a transfer at byte 0
        handle.write(b"hello ")
        handle.write(memoryview(b"world"))
        assert handle.tell() == 11
        handle.seek(0)
        assert handle.read() == b"hello world"
        handle.seek(6)
        assert handle.read(100) == b"world" and handle.read(3) == b""
        handle.seek(-5, io.SEEK_END)
        assert handle.read(2) == b"wo"
    assert buffer.closed and buffer.capacity == capacity


def test_fill_hashes_and_grows_past_the_announced_size():
    """Pins ``fill``: a file longer than the capacity asked for is read whole (grown, not cut),
    and the digest covers exactly the bytes read."""
    payload = bytes(range(256)) * 9_000  # about 2.3 MB: several reads
    digest = hashlib.sha256()
    with ShardBuffer().open(1000) as buffer:
        buffer.fill(io.BytesIO(payload), digest)
        assert buffer.tell() == len(payload)
        buffer.seek(0)
        assert buffer.read() == payload
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_pool_lends_a_released_buffer_again_and_refuses_double_opening():
    pool = BufferPool()
    first = pool.lend().open(10)
    second = pool.lend()
    assert second is not first
    with pytest.raises(RuntimeError, match="opened again"):
        first.open(10)
    first.close()
    assert pool.lend() is first


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive if member.isreg()}


class _CountingSource(ShardSource):
    def __init__(self, location: str):
        super().__init__(location)
        self.buffers: set[int] = set()
        self.kinds: list[str] = []

    def open_verified(self, entry, buffer=None):
        handle = super().open_verified(entry, buffer)
        if entry.name.startswith("shards/"):
            self.kinds.append(type(handle).__name__)
            if isinstance(handle, ShardBuffer):
                self.buffers.add(id(handle))
        return handle


def _samples(source: ShardSource, count: int, shuffle_buffer: int) -> list[dict]:
    split = Split(test_prefixes=("E061",))
    shards, total = select_shards(source.manifest, split, "train")
    assert len(shards) >= 3, "the test needs several shards"
    stream = ShardStream(source, shards, total, split, "train", 0, 1, TEX, ALL_FIELDS, seed=2,
                         shuffle_buffer=shuffle_buffer)  # fmt: skip
    samples = stream.raw_samples()
    taken = [next(samples) for _ in range(count)]
    samples.close()
    return taken


def test_samples_held_across_shards_keep_their_bytes_while_buffers_are_reused(shard_folder):
    """Pins the reuse rule: with a shuffle buffer holding samples of many shards while two memory
    buffers serve every shard in turn (two epochs' worth), each sample's members equal the
    shard file's members byte for byte."""
    source = _CountingSource(str(shard_folder))
    expected: dict[str, bytes] = {}
    for path in (shard_folder / "shards").glob("*.tar"):
        expected.update(_tar_members(path))
    per_epoch = sum(shard.num_samples for shard in source.manifest.shards)
    taken = _samples(source, 2 * per_epoch, shuffle_buffer=per_epoch)
    assert set(source.kinds) == {"ShardBuffer"} and len(source.buffers) == 2
    for sample in taken:
        for name, value in sample.items():
            if not name.startswith("__"):
                assert value == expected[f"{sample['__key__']}.{name}"], (sample["__key__"], name)


def test_shards_over_the_memory_limit_go_through_temporary_files(shard_folder, monkeypatch):
    """Pins the memory bound: a shard larger than MEMORY_SHARD_BYTES is spooled to a temporary
    file (the lent buffer goes back to the pool unused) and reads the same."""
    monkeypatch.setattr(data, "MEMORY_SHARD_BYTES", 1)
    source = ShardSource(str(shard_folder))
    entry = source.manifest.shards[0]
    pool = BufferPool()
    lent = pool.lend()
    with source.open_verified(entry, lent) as handle:
        assert isinstance(handle, tempfile.SpooledTemporaryFile)
        assert handle.read() == (shard_folder / entry.name).read_bytes()
    assert lent.closed and pool.lend() is lent
