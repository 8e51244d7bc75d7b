"""The ``delta-rice`` form (shards/rice.py): bit-exact round trips on the CPU decoder, members
within their slot capacity, corrupt members refused by name, and an ingest in this form decoding
to exactly the reference fields of the PNG ingest."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset
from PIL import Image

from shards import rice
from shards.codecs import decode_image, encode_image, packed_rice
from shards.decode import ALL_FIELDS, EntityMetadata, decode_sample, decode_stored
from shards.errors import FormatError
from shards.ingest import ingest
from shards.manifest import load_manifest, verify_folder


def _smooth(shape, noise, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 200, shape[0])[:, None, None]
    cols = np.linspace(0, 50, shape[1])[None, :, None]
    return np.clip(rows + cols + rng.normal(0, noise, shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (1, 7, 3), (5, 1, 3), (31, 4, 3), (32, 4, 3), (33, 4, 3), (37, 53, 3), (64, 64, 4)]
)
def test_random_pixels_round_trip_bit_exact_within_capacity(shape):
    """Pins the worst case: random bytes (every residual, escapes, k = 7) come back exactly, and
    the member fits ``rice.capacity`` (the slot size a loader reserves), a multiple of 4 bytes."""
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    member = rice.encode(pixels)
    assert len(member) <= rice.capacity(*shape) and len(member) % 4 == 0
    decoded = rice.decode(member, "random.drc")
    assert decoded.dtype == np.uint8 and decoded.shape == shape
    np.testing.assert_array_equal(decoded, pixels)


def test_escapes_and_wraparound_round_trip():
    """Pins the escape code (a quotient of 16 or more) and the modulo-256 steps both ways: flat
    segments (k = 0) broken by 0 -> 255 -> 0 jumps."""
    pixels = np.zeros((70, 9, 3), dtype=np.uint8)
    pixels[5::7] = 255
    pixels[:, 4, 1] = 128
    np.testing.assert_array_equal(rice.decode(rice.encode(pixels), "x.drc"), pixels)


def test_noisy_image_is_about_the_size_of_delta_zstd():
    """Pins the point of the form: on a smooth image with noise (sigma 3, like the bench's photos)
    it stays within 10% of delta-zstd's size and far below the raw pixels."""
    pytest.importorskip("zstandard")
    pixels = _smooth((512, 512, 3), 3.0)
    size, zstd_size = len(rice.encode(pixels)), len(encode_image(pixels, "delta-zstd"))
    assert size < 1.1 * zstd_size and size < 0.7 * pixels.nbytes


def test_synthetic_images_round_trip_bit_exact(entity):
    """Pins lossless storage of real-layout images: every PNG of the entity round-trips exactly."""
    paths = sorted(entity.rglob("*.png"))
    assert len(paths) > 10
    for path in paths:
        pixels = np.asarray(Image.open(path))
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        np.testing.assert_array_equal(decode_image(rice.encode(pixels), "drc", str(path)), pixels)


@pytest.mark.parametrize("where", ["magic", "segments", "table", "truncated", "empty"])
def test_corrupt_member_raises_format_error_naming_it(where):
    """Pins refusal by name of members whose header, column table or length is wrong (the
    payload itself is covered by each shard's sha256, checked before any decode)."""
    data = bytearray(rice.encode(np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)))
    if where == "magic":
        data[0] ^= 0x01
    elif where == "segments":
        data[5] = 16
    elif where == "table":
        data[rice.HEADER.size + 3] = 0xFF  # the first column's start, far past the member
    elif where == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:3]
    with pytest.raises(FormatError, match="bad.drc"):
        rice.decode(bytes(data), "bad.drc")
    with pytest.raises(FormatError, match="bad.drc"):
        packed_rice(bytes(data), "bad.drc")


def _samples(folder):
    urls = sorted(str(path) for path in (folder / "shards").glob("*.tar"))
    return {sample["__key__"]: sample for sample in webdataset.WebDataset(urls, shardshuffle=False)}


@pytest.fixture(scope="module")
def two_forms(entity_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("rice-forms")
    ingest(entity_cache, root / "png", shard_size=10**9, workers=2)
    ingest(entity_cache, root / "drc", shard_size=10**9, workers=2, image_codec="delta-rice")
    return root / "png" / entity_cache.name, root / "drc" / entity_cache.name


def test_ingest_decodes_to_exactly_the_png_fields(two_forms):
    """Pins bit-exact equality of every reference field between the PNG and delta-rice ingests
    (the uint8 path finished on the device: tests/trainer/test_gpu_decode.py), the packed form
    that path starts from, and the manifest naming the form with every shard verifying."""
    png, drc = two_forms
    assert load_manifest(drc).image_codec == "delta-rice" and verify_folder(drc).ok
    meta = EntityMetadata.from_shard_folder(png)
    png_samples, drc_samples = _samples(png), _samples(drc)
    assert set(png_samples) == set(drc_samples) and png_samples
    for key, sample in drc_samples.items():
        assert {"photo.drc", "tex.drc", "avg_tex.drc"} <= set(sample) and "photo.png" not in sample
        reference = decode_sample(png_samples[key], meta, 64)
        fast = decode_sample(sample, meta, 64)
        stored = decode_stored(sample, meta, ALL_FIELDS, keep_row_filter=True)
        assert stored["image_filter"] == "rice" and stored["photo"].ndim == 1
        assert stored["image_shapes"] == "avg_tex=64x64x3 photo={}x{}x3 tex=64x64x3".format(
            *reference["photo"].shape[:2]
        )
        np.testing.assert_array_equal(
            stored["photo"][: len(sample["photo.drc"])], np.frombuffer(sample["photo.drc"], np.uint8)
        )
        for name in ALL_FIELDS:
            if isinstance(reference[name], np.ndarray):
                assert fast[name].dtype == reference[name].dtype, name
                np.testing.assert_array_equal(fast[name], reference[name], err_msg=f"{key} {name}")
            else:
                assert fast[name] == reference[name], name
