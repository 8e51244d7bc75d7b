"""How a shard stores its images: the release's PNG bytes (default), ``delta-zstd`` or ``delta-rice``.

``delta-rice`` (``shards/rice.py``) is lossless too, and made for decoding on the GPU: about the
size of ``delta-zstd``, and a loader worker only copies its bytes (``trainer.gpu_rice`` decodes).

``delta-zstd`` is a lossless form that decodes several times faster than PNG (about 15-20 ms
instead of 40-110 ms for a 2048 x 1334 photo on one core, ``bench/bench_input.py``): the 8-bit
RGB pixels, each row minus the row above it (PNG's "Up" filter, modulo 256), compressed with
zstd at level 1. Decoding is one zstd call plus one vectorised add per row. On noisy, photo-like
pixels it is about the size of the PNG; on smooth synthetic images it is smaller.

A member holds a 16-byte header, then one zstd frame (with content size and checksum)::

    b"MFDZ" | version u8 = 1 | filter u8 = 1 (up) | channels u16 | rows u32 | cols u32   (little endian)

``zstandard`` is imported only when this form is written or read, so PNG-only installs work
without it (``pip install zstandard==0.25.0``).
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from shards import rice
from shards.errors import FormatError

IMAGE_CODECS = ("png", "delta-zstd", "delta-rice")
"""Stored image forms, the manifest's ``image_codec`` values."""

EXTENSIONS = {"png": "png", "delta-zstd": "dzst", "delta-rice": "drc"}
"""Member extension of each form: ``photo.png`` or ``photo.dzst``."""

IMAGE_MEMBERS = ("photo", "tex", "avg_tex")
"""Sample members that are images (extension set by the form)."""

_MAGIC = b"MFDZ"
_VERSION = 1
_FILTER_UP = 1
_HEADER = struct.Struct("<4sBBHII")
ZSTD_LEVEL = 1  # levels 3-9 save under 5% on photo-like pixels and cost 3-25x the encode time


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise ImportError(
            "the delta-zstd image form needs the zstandard package: pip install zstandard==0.25.0"
        ) from None
    return zstandard


def check_codec(codec: str) -> str:
    """Return ``codec`` if it is a known form, else raise ``ValueError`` naming the choices."""
    if codec not in IMAGE_CODECS:
        raise ValueError(f"image codec {codec!r}: expected one of {', '.join(IMAGE_CODECS)}")
    return codec


def image_member(name: str, codec: str) -> str:
    """The member extension of image ``name`` (``photo``, ``tex``, ``avg_tex``) in form ``codec``."""
    return f"{name}.{EXTENSIONS[check_codec(codec)]}"


def encode_dzst(pixels: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """Encode (rows, cols, channels) uint8 pixels as a ``delta-zstd`` member.

    Args:
        pixels: (H, W, C) uint8 array, C <= 65535.
        level: zstd compression level.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected (H, W, C) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    rows, cols, channels = pixels.shape
    delta = np.array(pixels, copy=True, order="C")
    np.subtract(pixels[1:], pixels[:-1], out=delta[1:])  # uint8 arithmetic wraps modulo 256
    compressor = _zstd().ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    header = _HEADER.pack(_MAGIC, _VERSION, _FILTER_UP, channels, rows, cols)
    return header + compressor.compress(delta.data)


def decompress_dzst(data: bytes, source: str, out: np.ndarray | None = None) -> np.ndarray:
    """A ``delta-zstd`` member's pixels still row-filtered: row r holds row r minus row r - 1 (mod 256).

    :func:`undo_up_filter` (or ``trainer.gpu_decode.undo_up_filter`` on a batch, on the GPU)
    turns them into the pixels. Raises ``FormatError`` naming ``source`` for a bad member.

    Args:
        data: the member's bytes.
        source: its name, for errors.
        out: optional (H, W, C) uint8 C-contiguous array to decompress into, used when its
            shape is the image's (about twice as fast as into fresh memory, which the kernel
            must first fault in); otherwise a new array is returned.

    Returns:
        (H, W, C) uint8, writable: ``out`` when it was used.
    """
    if len(data) < _HEADER.size:
        raise FormatError(source, "a delta-zstd image (shorter than its 16-byte header)")
    magic, version, kind, channels, rows, cols = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION or kind != _FILTER_UP:
        raise FormatError(
            source,
            "a delta-zstd image version 1 (header MFDZ, filter 1)",
            found=f"{magic!r} v{version} f{kind}",
        )
    expected = rows * cols * channels
    zstandard = _zstd()
    usable = (
        out is not None
        and out.shape == (rows, cols, channels)
        and out.dtype == np.uint8
        and out.flags.c_contiguous
        and out.flags.writeable
    )
    try:
        if usable:
            assert out is not None
            size = _decompress_into(zstandard, memoryview(data)[_HEADER.size :], out)
            if size == expected:
                return out
        else:
            raw = zstandard.ZstdDecompressor().decompress(data[_HEADER.size :], max_output_size=expected)
            size = len(raw)
            if size == expected:
                return np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(rows, cols, channels)
    except zstandard.ZstdError as error:
        raise FormatError(source, f"an intact zstd frame ({error}; corrupt)") from None
    raise FormatError(source, f"{expected} pixel bytes ({rows}x{cols}x{channels})", found=f"{size}")


def _decompress_into(zstandard, frame: memoryview, out: np.ndarray) -> int:
    """Decompress one zstd frame into ``out``; the bytes written (more than fit: ``out.nbytes + 1``).

    Reading on to the end of the frame makes zstd check its content checksum.
    """
    target = memoryview(out).cast("B")
    done = 0
    with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as reader:
        while done < len(target):
            count = reader.readinto(target[done:])
            if not count:
                break
            done += count
        if reader.read(1):
            done += 1
    return done


def undo_up_filter(filtered: np.ndarray) -> np.ndarray:
    """Undo the "Up" row filter in place: each row plus the (already restored) row above, mod 256.

    Args:
        filtered: (H, W, C) uint8 from :func:`decompress_dzst`, writable.

    Returns:
        ``filtered``, now the pixels.
    """
    rows = filtered.reshape(filtered.shape[0], -1)
    add = np.add
    for row in range(1, rows.shape[0]):
        # A per-row loop: numpy's cumsum along axis 0 is about 10x slower than these adds.
        add(rows[row], rows[row - 1], out=rows[row])
    return filtered


def decode_dzst(data: bytes, source: str) -> np.ndarray:
    """Decode a ``delta-zstd`` member to (H, W, C) uint8 pixels, or raise ``FormatError`` naming ``source``."""
    return undo_up_filter(decompress_dzst(data, source))


def decode_png(data: bytes, source: str) -> np.ndarray:
    """Decode a PNG member to its stored pixels, (H, W, C) uint8, or raise ``FormatError``."""
    # OpenCV's PNG decoder is 1.2-3x faster than Pillow's here and gives the same pixels.
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise FormatError(source, "a decodable PNG")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise FormatError(source, "an 8-bit RGB PNG", found=f"array {pixels.shape} {pixels.dtype}")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def encode_image(pixels: np.ndarray, codec: str) -> bytes:
    """(H, W, C) uint8 pixels as a member of a lossless form other than PNG."""
    if codec == "delta-zstd":
        return encode_dzst(pixels)
    if codec == "delta-rice":
        return rice.encode(pixels)
    raise ValueError(f"image codec {codec!r}: pixels are re-encoded only as delta-zstd or delta-rice")


def packed_rice(data: bytes, source: str, out: np.ndarray | None = None) -> np.ndarray:
    """A ``delta-rice`` member as it travels to the GPU: its bytes at the start of a
    ``shards.rice.capacity`` buffer (the same size for every image of one shape).

    Args:
        data: the member's bytes.
        source: its name, for errors.
        out: a (capacity,) uint8 buffer to write into when its size is right (then returned).
    """
    (rows, cols, channels), _ = rice.column_starts(data, source)
    size = rice.capacity(rows, cols, channels)
    if len(data) > size or len(data) % 4:
        raise FormatError(
            source, f"a delta-rice member of at most {size} bytes, a multiple of 4", found=str(len(data))
        )
    if out is None or out.shape != (size,) or out.dtype != np.uint8 or not out.flags.writeable:
        out = np.zeros(size, dtype=np.uint8)
    out[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


def decode_image(
    data: bytes, extension: str, source: str, keep_row_filter: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Pixels of an image member of any form, chosen by its extension (``png``, ``dzst``, ``drc``).

    With ``keep_row_filter`` (the uint8 path that finishes decoding on the GPU) a ``dzst``
    member comes back still row-filtered (:func:`decompress_dzst`) and a ``drc`` member still
    packed (:func:`packed_rice`); PNG members are always pixels.
    ``out``: an array to write into when the shapes agree (then returned), else ignored.
    """
    if extension == "dzst":
        pixels = decompress_dzst(data, source, out)
        return pixels if keep_row_filter else undo_up_filter(pixels)
    if extension == "drc":
        if keep_row_filter:
            return packed_rice(data, source, out)
        pixels = rice.decode(data, source)
    elif extension == "png":
        pixels = decode_png(data, source)
    else:
        raise FormatError(source, "an image member ending in .png, .dzst or .drc", found=extension)
    if out is not None and out.shape == pixels.shape and out.dtype == pixels.dtype:
        np.copyto(out, pixels)
        return out
    return pixels
