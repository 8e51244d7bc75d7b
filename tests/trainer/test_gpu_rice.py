"""Decoding batches of ``delta-rice`` members: the CPU fallback here, and (marked ``gpu``) the
Triton kernel, bit for bit the encoded pixels at the real image sizes with stale bytes after
each member (a reused ring slot).

The GPU test runs on the GPU machine (fails instead of skipping without CUDA)::

    REQUIRE_GPU=1 python -m pytest tests/trainer/test_gpu_rice.py -m gpu -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shards import rice
from shards.codecs import packed_rice
from trainer import gpu_rice


def _smooth(shape, noise, seed):
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 200, shape[0])[:, None, None]
    return np.clip(rows + rng.normal(0, noise, shape), 0, 255).astype(np.uint8)


def _batch(shape, images):
    slot = np.random.default_rng(7).integers(0, 256, (len(images), rice.capacity(*shape)), dtype=np.uint8)
    for index, pixels in enumerate(images):
        packed_rice(rice.encode(pixels), "x.drc", out=slot[index])
    return slot


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1334, 2048, 3), (1024, 1024, 3), (33, 7, 3), (1, 1, 1), (100, 300, 4)])
def test_gpu_decode_equals_the_pixels(cuda_device, shape):
    """Pins the kernel against the encoder's input (and so the CPU decoder): smooth-plus-noise
    images (k from 1 to 4), random bytes (k = 7 and escapes) and flat images with 0 <-> 255
    jumps, in one batch."""
    assert gpu_rice.triton is not None, "the GPU image must bring Triton (torch's CUDA wheels do)"
    rng = np.random.default_rng(sum(shape))
    rows = np.linspace(0, 200, shape[0])[:, None, None]
    smooth = np.clip(rows + rng.normal(0, 3, shape), 0, 255).astype(np.uint8)
    jumps = np.zeros(shape, dtype=np.uint8)
    jumps[3::5] = 255
    images = [smooth, rng.integers(0, 256, shape, dtype=np.uint8), jumps]
    slot = _batch(shape, images)
    decoded = gpu_rice.decode_batch(torch.from_numpy(slot).to(cuda_device), shape)
    assert decoded.device.type == "cuda" and decoded.shape == (3, *shape)
    host = decoded.cpu().numpy()
    for index, pixels in enumerate(images):
        np.testing.assert_array_equal(host[index], pixels, err_msg=f"image {index}")


def test_batches_decode_on_the_cpu_from_slots_with_stale_bytes():
    """Pins the loader path: the member's bytes at the start of a capacity-sized buffer (the given
    slot when it fits), then ``decode_batch`` (here its CPU fallback) gives the
    pixels even with stale bytes after each member."""
    shape = (45, 21, 3)
    images = [_smooth(shape, 4.0, seed) for seed in range(3)]
    slot = np.full((3, rice.capacity(*shape)), 0xA5, dtype=np.uint8)  # stale bytes
    for index, pixels in enumerate(images):
        assert np.shares_memory(packed_rice(rice.encode(pixels), "x.drc", out=slot[index]), slot[index])
    decoded = gpu_rice.decode_batch(torch.from_numpy(slot), shape)
    assert decoded.shape == (3, *shape) and decoded.dtype == torch.uint8
    for index, pixels in enumerate(images):
        np.testing.assert_array_equal(decoded[index].numpy(), pixels)
    fresh = packed_rice(rice.encode(images[0]), "x.drc", out=np.zeros(5, dtype=np.uint8))
    assert fresh.shape == (rice.capacity(*shape),)
    with pytest.raises(ValueError, match=r"expected \(N, \d+\) uint8 for 45x21x3"):
        gpu_rice.decode_batch(torch.from_numpy(slot[:, :-4]), shape)
