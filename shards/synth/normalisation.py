"""The entity's normalisation statistics, computed from the files that were written.

* ``tex_mean.png``: per texel, the mean of the average textures over the frames in which the
  texel is seen (0 where it never is), rounded to uint8, in PNG orientation like the textures.
* ``tex_var.txt``: the mean squared deviation of seen average-texture values from
  ``tex_mean`` (over frames, texels and channels), so that the seed's
  ``(t - texmean) / sqrt(tex_var)`` has unit variance.
* ``vert_mean.bin``: the mean mesh, float32.
* ``vert_var.txt``: the mean squared deviation of mesh coordinates from ``vert_mean``.

A variance of exactly 0 (a single frame) is written as 1, because the seed's normalisation
divides by its square root; any other value is written as computed.

Sums of uint8 textures are kept in int64, so the statistics do not depend on summation order.
"""

from __future__ import annotations

import numpy as np

from shards.layout import NUM_VERTICES, EntityLayout
from shards.synth.files import read_png, write_png, write_scalar


def _usable(variance: float) -> float:
    return variance if variance > 0.0 else 1.0


def write_statistics(layout: EntityLayout, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """Write tex_mean.png, tex_var.txt, vert_mean.bin and vert_var.txt.

    Args:
        layout: the entity.
        pairs: (expression, frame) of every frame, in frame-list order; their average
            textures and mesh ``.bin`` files must exist.

    Returns:
        (tex_var, vert_var) as written.
    """
    shape = read_png(layout.average_texture(*pairs[0])).shape
    total, total_square = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    seen = np.zeros(shape[:2], dtype=np.int64)
    for expression, frame in pairs:
        texture = read_png(layout.average_texture(expression, frame)).astype(np.int64)
        total += texture
        total_square += texture * texture
        seen += texture.any(axis=2)
    mean = np.where(seen[..., None] > 0, np.rint(total / np.maximum(seen, 1)[..., None]), 0).astype(np.int64)
    write_png(layout.tex_mean, mean.astype(np.uint8))
    # Sum over seen frames of (x - m)^2, expanded so that it needs no second pass; exact in int64.
    square_deviation = total_square - 2 * mean * total + seen[..., None] * mean * mean
    count = 3 * int(seen.sum())
    tex_var = _usable(float(square_deviation.sum()) / max(count, 1))
    write_scalar(layout.tex_var, tex_var)

    vertex_total = np.zeros(NUM_VERTICES * 3)
    for expression, frame in pairs:
        vertex_total += np.fromfile(layout.mesh_bin(expression, frame), dtype="<f4")
    vert_mean = (vertex_total / len(pairs)).astype(np.float32)
    layout.vert_mean.write_bytes(vert_mean.astype("<f4").tobytes())
    deviation = 0.0
    for expression, frame in pairs:
        difference = (
            np.fromfile(layout.mesh_bin(expression, frame), dtype="<f4").astype(np.float64) - vert_mean
        )
        deviation += float(difference @ difference)
    vert_var = _usable(deviation / (len(pairs) * NUM_VERTICES * 3))
    write_scalar(layout.vert_var, vert_var)
    return tex_var, vert_var
