"""Decode a batch of ``delta-rice`` images on the GPU (``shards.rice`` describes the form).

The loader's workers copy each member's bytes into a fixed-size slot (``shards.rice.capacity``),
so a batch of one image field is an (N, capacity) uint8 tensor. One Triton kernel decodes it:
one lane per column (one channel of one pixel column), top to bottom, each value added to the
pixel above, so the output is already the pixels (no separate row-filter pass) and neighbouring
lanes write neighbouring bytes. Without CUDA (tests, CPU runs) or without Triton the same batch
is decoded by ``shards.rice.decode`` on the CPU, bit for bit the same.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from shards import rice

LANES = 128
"""Columns per Triton program."""


try:  # CUDA builds of torch bring Triton; without it (CPU installs) the CPU decoder serves
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _window(words, position, valid, limit):
        # The 32 bits that start at bit `position` of each lane's stream (zeros past the member).
        index = position >> 5
        low = tl.load(words + index, mask=valid & (index < limit), other=0).to(tl.uint32, bitcast=True)
        high = tl.load(words + index + 1, mask=valid & (index + 1 < limit), other=0).to(
            tl.uint32, bitcast=True
        )
        pair = low.to(tl.uint64) | (high.to(tl.uint64) << 32)
        return (pair >> (position & 31).to(tl.uint64)).to(tl.uint32)

    @triton.jit
    def _decode_kernel(
        members,  # (N, capacity / 4) int32
        pixels,  # (N, rows, streams) uint8
        member_words,
        rows,
        streams,
        SEGMENT: tl.constexpr,
        K_BITS: tl.constexpr,
        MAX_K: tl.constexpr,
        ESCAPE: tl.constexpr,
        HEADER_WORDS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        image = tl.program_id(0).to(tl.int64)
        lane = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = lane < streams
        words = members + image * member_words
        position = tl.load(words + HEADER_WORDS + lane, mask=valid, other=0).to(tl.int64) * 32
        previous = tl.zeros([BLOCK], dtype=tl.uint32)
        out = pixels + image * rows * streams + lane
        for segment in range(0, tl.cdiv(rows, SEGMENT)):
            k = _window(words, position, valid, member_words) & MAX_K
            position += K_BITS
            for step in range(0, SEGMENT):
                row = segment * SEGMENT + step
                live = valid & (tl.zeros([BLOCK], dtype=tl.int32) + row < rows)
                bits = _window(words, position, valid, member_words)
                # Trailing one-bits (capped at ESCAPE): the lowest zero bit, as a power of two.
                zeros = ~bits | (1 << ESCAPE)
                lowest = zeros & (0 - zeros)
                ones = ((lowest.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127).to(tl.uint32)
                escape = ones >= ESCAPE
                rice_value = (ones << k) | ((bits >> (ones + 1)) & ((1 << k) - 1))
                value = tl.where(escape, bits >> ESCAPE, rice_value) & 255
                position += tl.where(escape, ESCAPE + 8, ones + 1 + k).to(tl.int64)
                signed = (value >> 1) ^ (0 - (value & 1))
                previous = (previous + signed) & 255
                tl.store(out + row * streams, previous.to(tl.uint8), mask=live)


def decode_batch(members: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Pixels of a batch of ``delta-rice`` members of one image shape.

    Args:
        members: (N, capacity) uint8, each row a member's bytes (zero or stale bytes after its
            end), capacity ``shards.rice.capacity(*shape)``; on the GPU or the CPU.
        shape: (rows, cols, channels) of every image.

    Returns:
        (N, rows, cols, channels) uint8 on ``members``' device.
    """
    rows, cols, channels = shape
    expected = rice.capacity(rows, cols, channels)
    if members.dtype != torch.uint8 or members.dim() != 2 or members.shape[1] != expected:
        raise ValueError(
            f"delta-rice batch {tuple(members.shape)} {members.dtype}: expected (N, {expected}) uint8 "
            f"for {rows}x{cols}x{channels} images"
        )
    if not members.is_cuda or triton is None:
        if members.is_cuda:
            warnings.warn("Triton is not installed: delta-rice images are decoded on the CPU", stacklevel=2)
        host = members.cpu().numpy()
        decoded = [
            rice.decode(row.tobytes(), f"delta-rice batch member {index}") for index, row in enumerate(host)
        ]
        stacked = np.stack(decoded) if decoded else np.zeros((0, rows, cols, channels), np.uint8)
        return torch.from_numpy(stacked).to(members.device)
    members = members.contiguous()
    count, streams = members.shape[0], cols * channels
    pixels = torch.empty((count, rows, cols, channels), dtype=torch.uint8, device=members.device)
    if count:
        grid = (count, -(-streams // LANES))
        with torch.cuda.device(members.device):
            _decode_kernel[grid](
                members.view(torch.int32),
                pixels,
                expected // 4,
                rows,
                streams,
                SEGMENT=rice.SEGMENT_ROWS,
                K_BITS=rice.K_BITS,
                MAX_K=rice.MAX_K,
                ESCAPE=rice.ESCAPE_ONES,
                HEADER_WORDS=rice.HEADER.size // 4,
                BLOCK=LANES,
            )
    return pixels
