"""Decoding threads (``--loader threads``) give what DataLoader worker processes give: the same
batches in the same order, every field equal; errors reach the consumer; close stops the threads."""

from __future__ import annotations

import pytest
import torch

from shards.decode import ALL_FIELDS
from shards.ingest import ingest
from trainer.data import ShardSource, ShardStream, Split, select_shards
from trainer.feeder import ThreadedBatches, collate

TEX = 64  # the small entity's texture side (tests/conftest.py)


@pytest.fixture(scope="module")
def shard_folder(entity_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("feeder-shards")
    ingest(entity_cache, root, shard_size=400_000, workers=2, image_codec="delta-zstd")
    return root / entity_cache.name


def _stream(folder, device_finish: bool) -> ShardStream:
    source = ShardSource(str(folder))
    split = Split(test_prefixes=("E061",))
    shards, count = select_shards(source.manifest, split, "train")
    assert len(shards) >= 3, "the test needs several shards for several worker slots"
    return ShardStream(source, shards, count, split, "train", 0, 1, TEX, ALL_FIELDS, seed=5,
                       shuffle_buffer=3, device_finish=device_finish)  # fmt: skip


def _assert_same(first: dict, second: dict) -> None:
    assert set(first) == set(second)
    for name, value in first.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == second[name].dtype, name
            torch.testing.assert_close(value, second[name], rtol=0, atol=0, msg=name)
        else:
            assert value == second[name], name


@pytest.mark.parametrize("device_finish", [False, True])
def test_threads_give_the_batches_worker_processes_give(shard_folder, device_finish):
    """Pins the loader equivalence: ThreadedBatches(threads=3) yields the batches of
    DataLoader(num_workers=3) in the same order with every field bit-equal, across an epoch."""
    stream = _stream(shard_folder, device_finish)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=3)
    expected = []
    for batch in loader:
        expected.append(batch)
        if len(expected) == 9:
            break
    threaded = ThreadedBatches(stream, batch_size=2, threads=3)
    try:
        for want, got in zip(expected, threaded, strict=False):
            _assert_same(want, got)
    finally:
        threaded.close()
    assert not any(thread.is_alive() for thread in threaded._threads)


def test_collate_matches_default_collate_and_pins_on_request(shard_folder):
    """Pins the one-copy collate against torch's default_collate, field by field."""
    stream = _stream(shard_folder, device_finish=True)
    samples = []
    for sample in stream:
        samples.append(sample)
        if len(samples) == 3:
            break
    _assert_same(torch.utils.data.default_collate(samples), collate(samples))
    if torch.cuda.is_available():
        assert collate(samples, pin_memory=True)["photo"].is_pinned()


def test_a_thread_error_reaches_the_consumer(shard_folder, tmp_path):
    """Pins error propagation: a shard that fails its sha256 on every slot ends in the
    consumer's RuntimeError naming the cause, and no decoding thread is left running."""
    import shutil

    folder = tmp_path / shard_folder.name
    shutil.copytree(shard_folder, folder)
    for path in (folder / "shards").glob("*.tar"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    threaded = ThreadedBatches(_stream(folder, device_finish=True), batch_size=2, threads=2)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(threaded))
    threaded.close()
    assert not any(thread.is_alive() for thread in threaded._threads)


def test_worker_slots_are_checked(shard_folder):
    with pytest.raises(ValueError, match="worker 3 of 3"):
        _stream(shard_folder, device_finish=False).for_worker(3, 3)
    with pytest.raises(ValueError, match="threads 0"):
        ThreadedBatches(_stream(shard_folder, device_finish=False), batch_size=2, threads=0)
