"""The batch ring (``--loader ring``) gives what a plain DataLoader gives: the same batches in the
same order, every field equal, with worker processes writing into their reused slots."""

from __future__ import annotations

import pytest
import torch

from shards.decode import ALL_FIELDS
from shards.ingest import ingest
from trainer.data import ShardSource, ShardStream, Split, select_shards
from trainer.feeder import RingBatches
from trainer.gpu_decode import TextureStatistics, finish_on_device, unpack_rice

TEX = 64  # the small entity's texture side (tests/conftest.py)


@pytest.fixture(scope="module", params=["delta-zstd", "delta-rice"])
def shard_folder(request, entity_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("feeder-shards")
    ingest(entity_cache, root, shard_size=400_000, workers=2, image_codec=request.param)
    return root / entity_cache.name


def _stream(folder, device_finish: bool) -> ShardStream:
    source = ShardSource(str(folder))
    split = Split(test_prefixes=("E061",))
    shards, count = select_shards(source.manifest, split, "train")
    assert len(shards) >= 3, "the test needs several shards for several worker slots"
    return ShardStream(source, shards, count, split, "train", 0, 1, TEX, ALL_FIELDS, seed=5,
                       shuffle_buffer=3, device_finish=device_finish)  # fmt: skip


def _assert_same(first: dict, second: dict) -> None:
    if "image_shapes" in first:
        # Packed delta-rice images: a reused slot keeps stale bytes after a member's end (never
        # read); what must agree is the images they decode to.
        first, second = dict(first), dict(second)
        for batch in (first, second):
            unpack_rice(batch, batch["image_filter"], batch["image_shapes"])
    assert set(first) == set(second)
    for name, value in first.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == second[name].dtype, name
            torch.testing.assert_close(value, second[name], rtol=0, atol=0, msg=name)
        else:
            assert value == second[name], name


@pytest.mark.parametrize("device_finish", [False, True])
def test_ring_gives_the_batches_a_dataloader_gives(shard_folder, device_finish):
    """Pins the loader equivalence over more batches than a worker has slots (so every slot is
    reused): RingBatches(workers=2) yields DataLoader(num_workers=2)'s batches in the same order,
    every field bit-equal (delta-rice images once decoded), and earlier batches are not
    overwritten by later ones."""
    stream = _stream(shard_folder, device_finish)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2)
    expected = []
    for batch in loader:
        expected.append(batch)
        if len(expected) == 14:  # 7 per worker, slots per worker: prefetch 2 + 2
            break
    ring = RingBatches(stream, batch_size=2, workers=2, device=torch.device("cpu"))
    received = []
    try:
        for batch in ring:
            received.append(batch)
            if len(received) == len(expected):
                break
    finally:
        ring.close()
    for want, got in zip(expected, received, strict=True):
        _assert_same(want, got)


def test_ring_needs_workers(shard_folder):
    with pytest.raises(ValueError, match="workers 0"):
        RingBatches(
            _stream(shard_folder, device_finish=False), batch_size=2, workers=0, device=torch.device("cpu")
        )


def _finished_pairs(folder, device: torch.device, count: int) -> list[tuple[dict, dict]]:
    """(DataLoader batch finished on the CPU, ring batch finished by the ring on ``device``)."""
    stream = _stream(folder, device_finish=True)
    stats = TextureStatistics.build(stream.source.metadata(), torch.device("cpu"))
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2)
    expected = []
    for batch in loader:
        expected.append(finish_on_device(batch, stats, TEX))
        if len(expected) == count:
            break
    device_stats = TextureStatistics.build(stream.source.metadata(), device)
    ring = RingBatches(
        stream, batch_size=2, workers=2, device=device,
        finish=lambda batch: finish_on_device(batch, device_stats, TEX),
    )  # fmt: skip
    received = []
    try:
        for batch in ring:
            received.append(batch)  # all kept: a later batch must not overwrite an earlier one
            if len(received) == count:
                break
        received = [{name: value.cpu() if torch.is_tensor(value) else value for name, value in batch.items()}
                    for batch in received]  # fmt: skip
    finally:
        ring.close()
    return list(zip(expected, received, strict=True))


def test_ring_finishes_batches_like_the_loop_does(shard_folder):
    """Pins the ring's ``finish``: on the CPU the ring's finished batches equal a DataLoader's
    batches finished by ``finish_on_device`` afterwards (what trainer.loop did before)."""
    for want, got in _finished_pairs(shard_folder, torch.device("cpu"), 10):
        _assert_same(want, got)


@pytest.mark.gpu
@pytest.mark.parametrize("indexed", [True, False])
def test_ring_copies_and_finishes_ahead_on_the_gpu(shard_folder, cuda_device, indexed):
    """Pins the copy-stream path on CUDA: batches copied and finished on the ring's own stream
    one batch ahead of the consumer are bit-equal to the CPU's finish of the same DataLoader
    batches, in the same order, with every batch still held (slots and device memory reused
    without corruption); for ``cuda:N`` and for a bare ``cuda``."""
    device = cuda_device if indexed else torch.device("cuda")
    for want, got in _finished_pairs(shard_folder, device, 12):
        _assert_same(want, got)
