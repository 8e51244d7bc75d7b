"""The ``delta-rice`` form (shards/rice.py): bit-exact round trips on the CPU decoder, members
within their slot capacity, corrupt members refused by name, and the packed form that the GPU
path starts from (the reference fields of an ingest in this form: test_codecs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset
from PIL import Image

from shards import rice
from shards.codecs import decode_image, encode_image, packed_rice
from shards.decode import ALL_FIELDS, EntityMetadata, decode_stored
from shards.errors import FormatError
from shards.ingest import ingest


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
    return list(webdataset.WebDataset(urls, shardshuffle=False))


def test_stored_form_is_the_packed_member_with_its_shapes(entity_cache, tmp_path):
    """Pins what the uint8 path hands the GPU for a delta-rice sample (the fields themselves:
    test_codecs.py, parametrised over the forms): each image packed as in the shard, at the
    start of a capacity-sized buffer, the shapes named, the form flagged."""
    ingest(entity_cache, tmp_path, shard_size=10**9, workers=2, image_codec="delta-rice")
    folder = tmp_path / entity_cache.name
    meta = EntityMetadata.from_shard_folder(folder)
    for sample in _samples(folder)[:3]:
        stored = decode_stored(sample, meta, ALL_FIELDS, keep_row_filter=True)
        assert stored["image_filter"] == "rice"
        shapes = dict(item.split("=") for item in stored["image_shapes"].split())
        assert set(shapes) == {"photo", "tex", "avg_tex"} and shapes["tex"] == "64x64x3"
        for name, shape in shapes.items():
            member = sample[f"{name}.drc"]
            rows, cols, channels = (int(side) for side in shape.split("x"))
            assert stored[name].shape == (rice.capacity(rows, cols, channels),)
            np.testing.assert_array_equal(stored[name][: len(member)], np.frombuffer(member, np.uint8))
