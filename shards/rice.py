"""The ``delta-rice`` image form: lossless, made to be decoded on the GPU.

A ``delta-zstd`` image costs its loader about 12 ms of CPU per sample in zstd alone, and on a
16-core GPU host that CPU time is what bounds the input pipeline (BENCHMARKS.md). This form moves
the whole decode to the GPU: a loader worker only copies the member's bytes into the batch, and
``trainer.gpu_rice`` decodes a batch of them with one kernel per image field.

How it is laid out so that a GPU can decode it in parallel: the image's bytes are read as
``cols * channels`` independent columns (a column is one channel of one pixel column, top to
bottom). Each column is coded on its own:

- every value is the pixel minus the pixel above it, modulo 256 (PNG's "Up" filter, as
  ``delta-zstd``), seen as a signed byte and zigzag-mapped to 0..255 (0, -1, 1, -2, ...);
- rows are grouped in segments of 32; each segment starts with 3 bits giving its Rice parameter
  ``k`` (0..7, the one that codes that segment in the fewest bits);
- a value ``z`` is coded as ``q = z >> k`` one-bits, a zero-bit, then the low ``k`` bits of ``z``;
  when ``q`` would be 16 or more, as 16 one-bits then the 8 bits of ``z`` (so no code is longer
  than 24 bits, and a column is never longer than 9 bits per value plus its segment headers).

Bits are packed least significant first into little-endian 32-bit words; every column starts
on a word. A GPU thread (or a numpy lane here) decodes one column top to bottom, adding each
value to the pixel above, and writes the pixels straight into (H, W, C) order: neighbouring
threads write neighbouring bytes.

A member::

    b"MFRC" | version u8 = 1 | segment rows u8 = 32 | channels u16 | rows u32 | cols u32   (little endian)
    cols * channels  u32   start of each column, in 32-bit words from the member's start
    the columns' words

On noisy photo-like pixels it is within a few percent of ``delta-zstd``'s size (Rice codes are
near-optimal for the two-sided geometric residuals of a smooth image plus noise).
"""

from __future__ import annotations

import struct

import numpy as np

from shards.errors import FormatError

MAGIC = b"MFRC"
VERSION = 1
SEGMENT_ROWS = 32
K_BITS = 3
MAX_K = 7
ESCAPE_ONES = 16
"""A quotient of 16 or more is coded as 16 one-bits and the raw byte."""
HEADER = struct.Struct("<4sBBHII")

# Trailing one-bits of every 17-bit window (16 means "16 or more": an escape).
_TRAILING_ONES = np.minimum(
    np.array([(~value & (value + 1)).bit_length() - 1 for value in range(1 << 17)], dtype=np.int64),
    ESCAPE_ONES,
).astype(np.uint8)


def parse_header(data: bytes | memoryview | np.ndarray, source: str) -> tuple[int, int, int]:
    """``(rows, cols, channels)`` of a ``delta-rice`` member, or ``FormatError`` naming ``source``."""
    head = bytes(data[: HEADER.size])
    if len(head) < HEADER.size:
        raise FormatError(source, "a delta-rice image (shorter than its 16-byte header)")
    magic, version, segment, channels, rows, cols = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION or segment != SEGMENT_ROWS:
        raise FormatError(
            source,
            f"a delta-rice image version {VERSION} (header MFRC, {SEGMENT_ROWS}-row segments)",
            found=f"{magic!r} v{version} segments of {segment}",
        )
    if not rows or not cols or not channels:
        raise FormatError(
            source, "a delta-rice image of at least one pixel", found=f"{rows}x{cols}x{channels}"
        )
    return rows, cols, channels


def capacity(rows: int, cols: int, channels: int) -> int:
    """The most bytes a ``rows x cols x channels`` member can take (a multiple of 4), plus one
    spare word so that a decoder's two-word reads never leave the member.

    A batch slot of this size holds any image of that shape (``shards.decode.decode_stored``).
    """
    streams = cols * channels
    segments = -(-rows // SEGMENT_ROWS)
    worst_words = -(-(segments * K_BITS + rows * (1 + 1 + MAX_K)) // 32)
    return HEADER.size + 4 * streams + 4 * streams * worst_words + 4


def _zigzag_residuals(pixels: np.ndarray) -> np.ndarray:
    """(rows, cols * channels) uint8: each pixel minus the one above (mod 256), zigzag-mapped."""
    flat = pixels.reshape(pixels.shape[0], -1)
    delta = flat.copy()
    np.subtract(flat[1:], flat[:-1], out=delta[1:])  # uint8 arithmetic wraps modulo 256
    signed = delta.view(np.int8)
    return ((signed.astype(np.int16) << 1) ^ (signed.astype(np.int16) >> 7)).astype(np.uint8)


def encode(pixels: np.ndarray) -> bytes:
    """Encode (rows, cols, channels) uint8 pixels as a ``delta-rice`` member."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected (H, W, C) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    rows, cols, channels = pixels.shape
    if not rows or not cols or not channels or channels > 0xFFFF:
        raise ValueError(f"cannot encode a {rows}x{cols}x{channels} image")
    streams = cols * channels
    segments = -(-rows // SEGMENT_ROWS)
    padded = segments * SEGMENT_ROWS
    values = np.zeros((padded, streams), dtype=np.uint8)
    values[:rows] = _zigzag_residuals(np.ascontiguousarray(pixels))

    # The Rice parameter of each (segment, column): the one giving the fewest bits. Lengths
    # fit a byte and a segment's sum 16 bits; the padding rows (zeros) are taken off again.
    best_bits = np.full((segments, streams), np.iinfo(np.int32).max, dtype=np.int32)
    best_k = np.zeros((segments, streams), dtype=np.uint8)
    for k in range(MAX_K + 1):
        quotient = values >> k
        length = np.where(quotient < ESCAPE_ONES, quotient + np.uint8(1 + k), np.uint8(ESCAPE_ONES + 8))
        bits = length.reshape(segments, SEGMENT_ROWS, streams).sum(axis=1, dtype=np.int32)
        bits[-1] -= (padded - rows) * (1 + k)
        better = bits < best_bits
        best_bits[better] = bits[better]
        best_k[better] = k

    # Every value's code (bits, length), column-major: column, segment, [header, 32 values].
    value_k = np.repeat(best_k, SEGMENT_ROWS, axis=0)
    quotient = values >> value_k
    escape = quotient >= ESCAPE_ONES
    quotient = np.minimum(quotient, np.uint8(ESCAPE_ONES)).astype(np.uint32)  # escapes coded apart
    wide, k32 = values.astype(np.uint32), value_k.astype(np.uint32)
    one = np.uint32(1)
    rice_code = ((one << quotient) - one) | ((wide & ((one << k32) - one)) << (quotient + one))
    code = np.where(escape, np.uint32((1 << ESCAPE_ONES) - 1) | (wide << np.uint32(ESCAPE_ONES)), rice_code)
    length = np.where(escape, np.uint8(ESCAPE_ONES + 8), (quotient + one + k32).astype(np.uint8))
    length[rows:] = 0  # padding rows: no code
    entries = SEGMENT_ROWS + 1
    codes = np.empty((streams, segments, entries), dtype=np.uint32)
    codes[:, :, 0] = best_k.T
    codes[:, :, 1:] = code.reshape(segments, SEGMENT_ROWS, streams).transpose(2, 0, 1)
    lengths = np.empty((streams, segments, entries), dtype=np.uint8)
    lengths[:, :, 0] = K_BITS
    lengths[:, :, 1:] = length.reshape(segments, SEGMENT_ROWS, streams).transpose(2, 0, 1)
    lengths = lengths.reshape(streams, -1)

    ends = np.cumsum(lengths, axis=1, dtype=np.int64)
    column_words = -(-ends[:, -1] // 32)
    table_words = (HEADER.size + 4 * streams) // 4
    starts = table_words + np.concatenate([[0], np.cumsum(column_words)[:-1]])
    total_words = table_words + int(column_words.sum())
    ends += (starts * 32)[:, None]
    positions = (ends - lengths).reshape(-1).view(np.uint64)  # each code's first bit; empty codes add nothing
    lengths = lengths.reshape(-1)
    codes = codes.reshape(-1).astype(np.uint64)

    words = np.zeros(-(-total_words // 2) + 1, dtype=np.uint64)  # 64-bit words, little endian
    index = positions >> np.uint64(6)
    offset = positions & np.uint64(63)
    _or_runs(words, index, codes << offset)
    spill = offset + lengths > 64
    _or_runs(words, index[spill] + 1, codes[spill] >> (np.uint64(64) - offset[spill]))

    member = bytearray(words.view(np.uint8)[: 4 * total_words].tobytes())
    HEADER.pack_into(member, 0, MAGIC, VERSION, SEGMENT_ROWS, channels, rows, cols)
    member[HEADER.size : HEADER.size + 4 * streams] = starts.astype("<u4").tobytes()
    return bytes(member)


def _or_runs(words: np.ndarray, index: np.ndarray, bits: np.ndarray) -> None:
    """``words[index] |= bits`` where ``index`` is sorted (runs of one index OR together)."""
    if not len(index):
        return
    run_starts = np.flatnonzero(np.concatenate([[True], index[1:] != index[:-1]]))
    words[index[run_starts]] |= np.bitwise_or.reduceat(bits, run_starts)


def column_starts(data: bytes | memoryview, source: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """The member's shape and its columns' start words, each checked to lie inside ``data``."""
    rows, cols, channels = parse_header(data, source)
    streams = cols * channels
    table_end = HEADER.size + 4 * streams
    if len(data) < table_end:
        raise FormatError(
            source, f"a delta-rice image with its {streams}-column table", found=f"{len(data)} bytes"
        )
    starts = np.frombuffer(data, dtype="<u4", count=streams, offset=HEADER.size).astype(np.int64)
    if streams and (starts.min() < table_end // 4 or starts.max() >= len(data) // 4):
        raise FormatError(source, "column starts inside the delta-rice member (corrupt)")
    return (rows, cols, channels), starts


def decode(data: bytes, source: str) -> np.ndarray:
    """(H, W, C) uint8 pixels of a ``delta-rice`` member (numpy, on the CPU), or ``FormatError``.

    Decodes every column in lockstep, one row per step (about 0.2 s for a 2048 x 1334 photo on
    one core: this form is for the GPU, ``trainer.gpu_rice``; the CPU path is for tests,
    evaluation and CPU-only runs).
    """
    (rows, cols, channels), starts = column_starts(data, source)
    length = len(data)
    words = np.zeros(length // 4 + 2, dtype=np.uint64)
    words[: length // 4] = np.frombuffer(data, dtype="<u4", count=length // 4)
    limit = 32 * (length // 4)
    position = starts * 32
    pixels = np.zeros((rows, cols * channels), dtype=np.uint8)
    previous = np.zeros(cols * channels, dtype=np.uint8)
    k = np.zeros(cols * channels, dtype=np.uint64)
    for row in range(rows):
        if row % SEGMENT_ROWS == 0:
            k = _window(words, position) & np.uint64(MAX_K)
            position += K_BITS
        window = _window(words, position)
        quotient = _TRAILING_ONES[(window & np.uint64(0x1FFFF)).astype(np.int64)].astype(np.uint64)
        escape = quotient >= ESCAPE_ONES
        remainder = (window >> (quotient + np.uint64(1))) & ((np.uint64(1) << k) - np.uint64(1))
        value = np.where(escape, window >> np.uint64(ESCAPE_ONES), (quotient << k) | remainder) & np.uint64(
            255
        )
        position += np.where(escape, ESCAPE_ONES + 8, quotient + np.uint64(1) + k).astype(np.int64)
        signed = (value >> np.uint64(1)).astype(np.uint8) ^ (
            np.uint8(0) - (value & np.uint64(1)).astype(np.uint8)
        )
        previous += signed  # wraps modulo 256: the pixel above plus this residual
        pixels[row] = previous
    if position.max() > limit:
        raise FormatError(source, "columns that end inside the delta-rice member (truncated or corrupt)")
    return pixels.reshape(rows, cols, channels)


def _window(words: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The 32 bits at each bit ``position`` (uint64 lanes; reads past the end give zeros)."""
    index = np.minimum(position >> 5, len(words) - 2)
    shift = (position & 31).astype(np.uint64)
    pair = words[index] | (words[index + 1] << np.uint64(32))
    return (pair >> shift) & np.uint64(0xFFFFFFFF)
