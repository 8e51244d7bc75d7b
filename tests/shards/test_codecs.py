"""The stored image forms: ``delta-zstd`` round-trips bit-exact, refuses corrupt bytes by name,
and a ``--image-codec delta-zstd`` or ``delta-rice`` ingest decodes to exactly the fields of the
PNG ingest (``delta-rice`` itself: test_rice.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset
from PIL import Image

from shards.codecs import EXTENSIONS, decode_dzst, decode_image, decode_png, decompress_dzst, encode_dzst
from shards.decode import ALL_FIELDS, EntityMetadata, decode_sample, decode_stored
from shards.errors import FormatError
from shards.ingest import ingest
from shards.manifest import MANIFEST_NAME, load_manifest, parse_manifest, verify_folder

pytest.importorskip("zstandard")


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (5, 1, 3), (37, 53, 3), (64, 64, 4), (2048, 13, 3)])
def test_random_pixels_round_trip_bit_exact(shape):
    """Pins the uint8 wraparound of the row delta: random bytes (every difference mod 256) come back exactly."""
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    decoded = decode_dzst(encode_dzst(pixels), "random.dzst")
    assert decoded.dtype == np.uint8 and decoded.shape == shape
    np.testing.assert_array_equal(decoded, pixels)


def test_extreme_rows_round_trip():
    """Pins 0 -> 255 and 255 -> 0 steps between rows (the wraparound both ways)."""
    pixels = np.zeros((6, 4, 3), dtype=np.uint8)
    pixels[1::2] = 255
    np.testing.assert_array_equal(decode_dzst(encode_dzst(pixels), "x.dzst"), pixels)


def test_synthetic_images_round_trip_bit_exact(entity):
    """Pins lossless storage of real-layout images: every PNG of the entity round-trips exactly."""
    paths = sorted(entity.rglob("*.png"))
    assert len(paths) > 10
    for path in paths:
        data = path.read_bytes()
        pixels = np.asarray(Image.open(path))
        np.testing.assert_array_equal(decode_png(data, str(path)), pixels)
        np.testing.assert_array_equal(decode_image(encode_dzst(pixels), "dzst", str(path)), pixels)


@pytest.mark.parametrize("where", ["payload", "checksum", "header", "truncated"])
def test_corrupt_member_raises_format_error_naming_it(where):
    """Pins that a flipped bit or a cut member is refused with the member's name, never decoded to wrong pixels."""
    pixels = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    data = bytearray(encode_dzst(pixels))
    if where == "payload":
        data[len(data) // 2] ^= 0x10
    elif where == "checksum":
        data[-1] ^= 0x01
    elif where == "header":
        data[0] ^= 0x01
    else:
        del data[-20:]
    with pytest.raises(FormatError, match=r"E057/000001/400002\.photo\.dzst"):
        decode_dzst(bytes(data), "E057/000001/400002.photo.dzst")


@pytest.mark.parametrize("where", ["payload", "checksum", "truncated", "extra"])
def test_decoding_into_a_buffer_checks_like_the_plain_decoder(where):
    """Pins the decode-into-``out`` path (batch slots in shared memory): corruption, a cut member
    and bytes after the frame are refused with the member's name, never left as wrong pixels."""
    pixels = np.random.default_rng(4).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    data = bytearray(encode_dzst(pixels))
    if where == "payload":
        data[len(data) // 2] ^= 0x10
    elif where == "checksum":
        data[-1] ^= 0x01
    elif where == "truncated":
        del data[-20:]
    else:
        data += encode_dzst(pixels)[16:]  # a second frame
    out = np.zeros_like(pixels)
    with pytest.raises(FormatError, match=r"photo\.dzst"):
        decompress_dzst(bytes(data), "photo.dzst", out)


def test_decoding_into_a_buffer_gives_the_same_pixels():
    """Pins that decoding into a caller's array equals decoding into fresh memory, row filter
    kept or undone, PNG too, and that an array of another shape is left alone."""
    pixels = np.random.default_rng(5).integers(0, 256, (41, 29, 3), dtype=np.uint8)
    data = encode_dzst(pixels)
    out = np.zeros_like(pixels)
    assert decompress_dzst(data, "x", out) is out
    np.testing.assert_array_equal(out, decompress_dzst(data, "x"))
    out[:] = 0
    assert decode_image(data, "dzst", "x", out=out) is out
    np.testing.assert_array_equal(out, pixels)
    wrong = np.zeros((40, 29, 3), dtype=np.uint8)
    result = decode_image(data, "dzst", "x", out=wrong)
    assert result is not wrong and not wrong.any()
    np.testing.assert_array_equal(result, pixels)
    png = decode_image(_png_bytes(pixels), "png", "x.png", out=out)
    assert png is out
    np.testing.assert_array_equal(out, pixels)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_wrong_pixel_count_is_refused():
    """Pins the header/payload size check: a header claiming other dimensions is refused."""
    data = bytearray(encode_dzst(np.zeros((4, 4, 3), dtype=np.uint8)))
    data[8:12] = (5).to_bytes(4, "little")  # rows 4 -> 5
    with pytest.raises(FormatError, match="tex.dzst"):
        decode_dzst(bytes(data), "tex.dzst")


def _samples(folder):
    urls = sorted(str(path) for path in (folder / "shards").glob("*.tar"))
    return {sample["__key__"]: sample for sample in webdataset.WebDataset(urls, shardshuffle=False)}


@pytest.fixture(params=["delta-zstd", "delta-rice"])
def two_forms(request, entity, tmp_path):
    """(PNG shard folder, folder of the same entity in a lossless fast form)."""
    ingest(entity, tmp_path / "png", shard_size=10**9, workers=2)
    ingest(entity, tmp_path / "fast", shard_size=10**9, workers=2, image_codec=request.param)
    return tmp_path / "png" / entity.name, tmp_path / "fast" / entity.name


@pytest.mark.parametrize("size", [64, 32])
def test_fast_form_decodes_to_exactly_the_png_fields(two_forms, size):
    """Pins bit-exact equality of every reference field between the PNG and each lossless form."""
    png, dzst = two_forms
    extension = EXTENSIONS[load_manifest(dzst).image_codec]
    meta = EntityMetadata.from_shard_folder(png)
    png_samples, dzst_samples = _samples(png), _samples(dzst)
    assert set(png_samples) == set(dzst_samples) and png_samples
    for key, sample in dzst_samples.items():
        assert {f"{name}.{extension}" for name in ("photo", "tex", "avg_tex")} <= set(sample)
        assert "photo.png" not in sample
        fast = decode_sample(sample, meta, size)
        reference = decode_sample(png_samples[key], meta, size)
        assert set(fast) == set(reference) == set(ALL_FIELDS)
        for name in ALL_FIELDS:
            if isinstance(reference[name], np.ndarray):
                assert fast[name].dtype == reference[name].dtype, name
                np.testing.assert_array_equal(fast[name], reference[name], err_msg=f"{key} {name}")
            else:
                assert fast[name] == reference[name], name
        stored = decode_stored(sample, meta, ALL_FIELDS)
        assert "mask" not in stored and stored["photo"].dtype == np.uint8
        np.testing.assert_array_equal(stored["photo"].astype(np.float32) / 255.0, reference["photo"])


def test_fast_form_manifest_and_verify(two_forms):
    """Pins the manifest field: "image_codec" recorded for the fast form, absent (PNG) otherwise,
    and both folders verify against their sha256."""
    png, dzst = two_forms
    codec = json.loads((dzst / MANIFEST_NAME).read_text())["image_codec"]
    assert "image_codec" not in json.loads((png / MANIFEST_NAME).read_text())
    assert codec in ("delta-zstd", "delta-rice")
    assert load_manifest(dzst).image_codec == codec and load_manifest(png).image_codec == "png"
    assert verify_folder(png).ok and verify_folder(dzst).ok


def test_unknown_image_codec_is_refused(two_forms):
    """Pins that a reader refuses a manifest whose image form it cannot decode, naming the field."""
    _, dzst = two_forms
    body = json.loads((dzst / MANIFEST_NAME).read_text())
    body["image_codec"] = "webp"
    with pytest.raises(FormatError, match="image_codec"):
        parse_manifest(json.dumps(body).encode())


def test_rerun_with_other_codec_rewrites_every_shard(entity, tmp_path):
    """Pins resume: shards of the other form are never kept under a manifest that names this form."""
    ingest(entity, tmp_path, shard_size=10**9)
    manifest = ingest(entity, tmp_path, shard_size=10**9, image_codec="delta-zstd")
    folder = tmp_path / entity.name
    assert manifest.image_codec == "delta-zstd" and verify_folder(folder).ok
    assert all(name.endswith(".dzst") or not name.endswith(".png") for name in _names(folder))


def _names(folder):
    import tarfile

    for path in (folder / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            yield from tar.getnames()


def test_unknown_codec_argument_is_refused(entity, tmp_path):
    """Pins the ingest argument check: the message names the value and the choices."""
    with pytest.raises(ValueError, match="png, delta-zstd"):
        ingest(entity, tmp_path, image_codec="webp")
