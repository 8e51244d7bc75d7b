"""The shard stream fetches the next shard while the current one is read (trainer/data.py), in
plan order and across epochs, keeps refusing a tampered shard, and drops what it fetched ahead
when the stream stops early."""

from __future__ import annotations

import itertools
import threading

import pytest

from shards.decode import ALL_FIELDS
from shards.ingest import ingest
from trainer.data import ShardSource, ShardStream, Split, select_shards, slot_shards

TEX = 64  # the small entity's texture side (tests/conftest.py)


class _RecordingSource(ShardSource):
    """A real local ShardSource that records each shard fetch: its name, thread and spool
    (metadata files are fetched through it too, and not recorded)."""

    def __init__(self, location: str):
        super().__init__(location)
        self.fetched: list[str] = []
        self.threads: set[str] = set()
        self.spools: list = []
        self.lock = threading.Lock()

    def open_verified(self, entry, buffer=None):
        spool = super().open_verified(entry, buffer)
        if not entry.name.startswith("shards/"):
            return spool
        with self.lock:
            self.fetched.append(entry.name)
            self.threads.add(threading.current_thread().name)
            self.spools.append(spool)
        return spool


@pytest.fixture(scope="module")
def shard_folder(entity_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch-ahead")
    ingest(entity_cache, root, shard_size=400_000, workers=2)
    return root / entity_cache.name


def _stream(source: ShardSource) -> ShardStream:
    split = Split(test_prefixes=("E061",))
    shards, count = select_shards(source.manifest, split, "train")
    assert len(shards) >= 3, "the test needs several shards"
    return ShardStream(source, shards, count, split, "train", 0, 1, TEX, ALL_FIELDS, seed=3, shuffle_buffer=1)


def test_next_shard_is_fetched_while_the_current_one_is_read(shard_folder):
    """Pins the overlap: once the first sample of shard 0 is out, shard 1 has been fetched (in
    the fetch thread) while nothing more was asked; the fetches follow the epoch plans in
    order, across the epoch boundary."""
    source = _RecordingSource(str(shard_folder))
    stream = _stream(source)
    samples = stream.raw_samples()
    first = next(samples)
    plan = [shard.name for epoch in (0, 1) for shard in slot_shards(stream.shards, epoch, 3, 0, 1)]
    for _ in range(50):  # the fetch thread finishes within moments
        if len(source.fetched) >= 2:
            break
        threading.Event().wait(0.05)
    assert source.fetched[:2] == plan[:2]
    assert source.threads and all(name.startswith("shard-fetch") for name in source.threads)
    assert first["__url__"] == plan[0]
    per_epoch = sum(shard.num_samples for shard in stream.shards)
    urls = [first["__url__"]] + [next(samples)["__url__"] for _ in range(per_epoch + 3)]
    assert source.fetched[: len(set(plan))] == plan[: len(set(plan))]
    assert set(urls) >= set(plan[: len(stream.shards)])
    samples.close()


def test_stopping_early_closes_the_shard_fetched_ahead(shard_folder):
    """Pins no leak: closing the stream after one sample closes the spool fetched ahead (once its
    fetch is done) as well as the one being read."""
    source = _RecordingSource(str(shard_folder))
    samples = _stream(source).raw_samples()
    next(samples)
    samples.close()
    for _ in range(50):
        if len(source.spools) >= 2 and all(spool.closed for spool in source.spools):
            break
        threading.Event().wait(0.05)
    assert len(source.spools) >= 2 and all(spool.closed for spool in source.spools)


@pytest.fixture(scope="module")
def photo_folder(entity_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("photo-shards")
    ingest(entity_cache, root, shard_size=400_000, workers=2, photo_shards=True)
    return root / entity_cache.name


@pytest.mark.parametrize("tampered", ["shard", "photo shard"])
def test_a_tampered_shard_is_still_refused_with_fetch_ahead(shard_folder, photo_folder, tmp_path, tampered):
    """Pins the integrity rule through the fetch thread: a shard (or the photo shard of a shard)
    with a flipped byte is reported and never yields a sample; the other shards go on."""
    import shutil

    origin = photo_folder if tampered == "photo shard" else shard_folder
    folder = tmp_path / origin.name
    shutil.copytree(origin, folder)
    source = ShardSource(str(folder))
    stream = _stream(source)
    bad = stream.shards[1]
    path = folder / (bad.photos.name if tampered == "photo shard" else bad.name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    samples = stream.raw_samples()
    per_epoch = sum(shard.num_samples for shard in stream.shards)
    urls = {next(samples)["__url__"] for _ in range(per_epoch)}
    samples.close()
    assert bad.name in stream.refused and bad.name not in urls


def _members(sample: dict) -> dict:
    return {name: value for name, value in sample.items() if name != "__url__"}


@pytest.mark.parametrize("fields", [ALL_FIELDS, tuple(name for name in ALL_FIELDS if name != "photo")])
def test_photo_shards_give_the_samples_of_whole_shards_and_are_fetched_only_for_photos(
    shard_folder, photo_folder, fields
):
    """Pins ``ingest --photo-shards`` on the reading side: the stream yields the same samples, in
    the same order and byte for byte, as from shards holding the photos; a run that reads no
    photo never downloads a photo shard, one that does fetches each with its shard."""
    whole = _RecordingSource(str(shard_folder))
    split = _RecordingSource(str(photo_folder))
    streams = []
    for source in (whole, split):
        chosen, count = select_shards(source.manifest, Split(test_prefixes=("E061",)), "train")
        streams.append(ShardStream(source, chosen, count, Split(test_prefixes=("E061",)), "train", 0, 1, TEX,
                                   fields, seed=3, shuffle_buffer=4))  # fmt: skip
    per_epoch = sum(shard.num_samples for shard in streams[0].shards)
    expected, got = (
        [_members(sample) for sample in itertools.islice(stream.raw_samples(), per_epoch)]
        for stream in streams
    )
    assert got == expected and all(("photo.png" in sample) == ("photo" in fields) for sample in got)
    fetched_photos = [name for name in split.fetched if name.endswith(".photo.tar")]
    assert bool(fetched_photos) == ("photo" in fields)
