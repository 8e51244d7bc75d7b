"""Normalising on the device gives decode_sample's fields: exact at the stored size, within
float32 rounding of cv2.resize otherwise; and the fast stored form keeps the per-shard sha256
check of the streaming path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset

from shards import rice
from shards.decode import ALL_FIELDS, EntityMetadata, decode_sample, decode_stored
from shards.errors import IntegrityError
from shards.ingest import ingest
from trainer.data import ShardSource, ShardStream, Split, select_shards
from trainer.gpu_decode import TextureStatistics, finish_on_device
from trainer.shard_buffer import BufferPool

pytest.importorskip("zstandard")

TEX = 64  # the small entity's texture side (tests/conftest.py)


@pytest.fixture(scope="module", params=["png", "delta-zstd", "delta-rice"])
def shard_folder(request, entity_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"shards-{request.param}")
    ingest(entity_cache, root, shard_size=10**9, workers=2, image_codec=request.param)
    return root / entity_cache.name


def _samples(folder):
    urls = sorted(str(path) for path in (folder / "shards").glob("*.tar"))
    return list(webdataset.WebDataset(urls, shardshuffle=False))


def _collate(items):
    return torch.utils.data.default_collate(items)


@pytest.mark.parametrize("size", [TEX, 32, 128])
def test_device_finish_equals_decode_sample(shard_folder, size):
    """Pins finish_on_device against decode_sample on every image field: bit-exact at the stored
    size (flip, zero mask, (t - mean) / std, photo / 255), float32 rounding with a resize."""
    meta = EntityMetadata.from_shard_folder(shard_folder)
    samples = _samples(shard_folder)[:4]
    stored = _collate([decode_stored(sample, meta, ALL_FIELDS, keep_row_filter=True) for sample in samples])
    assert stored["tex"].dtype == torch.uint8 and "mask" not in stored
    form = {"photo.dzst": "up", "photo.drc": "rice"}.get(
        next(name for name in samples[0] if name.startswith("photo.")), "none"
    )
    assert stored["image_filter"] == [form] * len(samples)
    batch = finish_on_device(stored, TextureStatistics.build(meta, torch.device("cpu")), size)
    assert "image_filter" not in batch and "image_shapes" not in batch
    reference = _collate([decode_sample(sample, meta, size) for sample in samples])
    for name in ("tex", "avg_tex", "mask", "photo"):
        assert batch[name].dtype == torch.float32 and batch[name].shape == reference[name].shape, name
        if size == TEX or name == "photo":
            torch.testing.assert_close(batch[name], reference[name], rtol=0, atol=0, msg=name)
        else:
            scale = float(reference[name].abs().max())
            torch.testing.assert_close(batch[name], reference[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    for name in ("aligned_verts", "M", "view", "cam", "uvs"):
        torch.testing.assert_close(batch[name], reference[name], rtol=0, atol=0, msg=name)
    assert batch["exp"] == reference["exp"] and batch["cam_idx"] == reference["cam_idx"]


def test_stream_with_device_finish_yields_stored_images(shard_folder):
    """Pins the ShardStream option: uint8 images as stored, small fields as decode_sample's."""
    source = ShardSource(str(shard_folder))
    split = Split(test_prefixes=("E061",))
    shards, count = select_shards(source.manifest, split, "train")
    fields = ("tex", "avg_tex", "mask", "photo", "aligned_verts", "cam")
    stream = ShardStream(source, shards, count, split, "train", 0, 1, TEX, fields, device_finish=True)
    sample = next(iter(stream))
    codec = source.manifest.image_codec
    if codec == "delta-rice":  # packed bytes, decoded on the device (trainer.gpu_rice)
        assert sample["tex"].dtype == np.uint8 and sample["tex"].shape == (rice.capacity(TEX, TEX, 3),)
        assert f"tex={TEX}x{TEX}x3" in sample["image_shapes"].split()
    else:
        assert sample["photo"].dtype == np.uint8 and sample["tex"].shape == (TEX, TEX, 3)
    assert "mask" not in sample and sample["aligned_verts"].dtype == np.float32
    assert sample["image_filter"] == {"delta-zstd": "up", "delta-rice": "rice"}.get(codec, "none")


def test_undo_up_filter_is_exact_and_a_mixed_batch_is_unfiltered_per_sample():
    """Pins the device-side unfiltering bit-exact against the CPU decoder on worst-case pixels
    (every value, wrap-around both ways), and a batch mixing forms (never within one manifest)."""
    from shards.codecs import decode_dzst, decompress_dzst, encode_dzst
    from trainer.gpu_decode import undo_up_filter

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 23, 3), dtype=np.uint8) for _ in range(3)]
    images[1][::2] = 255
    images[1][1::2] = 0
    encoded = [encode_dzst(image) for image in images]
    filtered = torch.from_numpy(np.stack([decompress_dzst(data, "test") for data in encoded]))
    expected = np.stack([decode_dzst(data, "test") for data in encoded])
    np.testing.assert_array_equal(undo_up_filter(filtered).numpy(), expected)
    np.testing.assert_array_equal(expected, np.stack(images))
    mixed = {"photo": filtered.clone(), "image_filter": ["up", "none", "up"]}
    mixed["photo"][1] = torch.from_numpy(images[1])
    stats = TextureStatistics(texmean=torch.zeros(1), texstd=torch.tensor(1.0))
    batch = finish_on_device(mixed, stats, 23)
    np.testing.assert_array_equal((batch["photo"] * 255).round().to(torch.uint8).numpy(), expected)


def test_tampered_fast_form_shard_is_refused(shard_folder, tmp_path):
    """Pins that the streaming path still checks sha256 per shard with either stored form: a
    shard with one flipped byte is refused by ShardSource.open_verified before any sample is used,
    read into a temporary file or into a worker's reused memory buffer (which is then released
    for the next shard)."""
    import shutil

    folder = tmp_path / shard_folder.name
    shutil.copytree(shard_folder, folder)
    source = ShardSource(str(folder))
    entry = source.manifest.shards[0]
    path = folder / entry.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=entry.name):
        source.open_verified(entry)
    pool = BufferPool()
    lent = pool.lend()
    with pytest.raises(IntegrityError, match=entry.name):
        source.open_verified(entry, lent)
    assert lent.closed and pool.lend() is lent
    split = Split(test_prefixes=())
    stream = ShardStream(source, [entry], entry.num_samples, split, "train", 0, 1, TEX, ("tex", "cam"))
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(stream))
    assert stream.refused == [entry.name]
