"""A numpy triangle rasteriser and texture sampler with nvdiffrast's conventions.

The seed renders with nvdiffrast after dividing by depth itself and passing w = 1, so the
rasteriser interpolates attributes *linearly in screen space* (not perspective-correctly).
This module does the same, so that photos rendered here match what the trainer's renderer
produces from the written files:

* pixel (row i, column j) has its centre at x = j + 0.5, y = i + 0.5;
* a pixel belongs to a triangle when its centre lies inside it (both windings, no culling);
* the nearest triangle wins, depth being interpolated linearly in screen space;
* textures are sampled bilinearly with texel centres at ((j + 0.5) / W, (i + 0.5) / H), row 0
  of the array being v = 0 (the PNG flipped vertically), with nvdiffrast's default 'wrap'
  addressing ('clamp' is available; the synthetic UV chart keeps a margin so both agree).

Work is vectorised over (triangle, pixel) candidates inside each triangle's bounding box, in
chunks, so memory stays bounded at 2048 x 1334.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_CANDIDATES = 1 << 21


@dataclass(frozen=True)
class Raster:
    """Which triangle covers each covered pixel, stored sparsely.

    Attributes:
        rows, cols: image size.
        pixel: (N,) int64 flat pixel index (row * cols + col), ascending, unique.
        triangle: (N,) int64 index of the nearest triangle covering the pixel centre.
        barycentric: (N, 3) float64 screen-space-linear weights of the triangle's corners.
        depth: (N,) float64 interpolated depth of the nearest triangle.
    """

    rows: int
    cols: int
    pixel: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray
    depth: np.ndarray

    def depth_map(self) -> np.ndarray:
        """(rows, cols) float64 depth buffer, +inf where no triangle covers the pixel."""
        depth = np.full(self.rows * self.cols, np.inf)
        depth[self.pixel] = self.depth
        return depth.reshape(self.rows, self.cols)

    def interpolate(self, attribute: np.ndarray, attribute_ids: np.ndarray) -> np.ndarray:
        """Interpolate a per-corner attribute at the covered pixels.

        Args:
            attribute: (A, C) float64 attribute values (e.g. UVs).
            attribute_ids: (F, 3) int64 indices into ``attribute`` for each triangle corner.

        Returns:
            (N, C) float64 values in ``pixel`` order.
        """
        corners = attribute[attribute_ids[self.triangle]]
        return np.einsum("nk,nkc->nc", self.barycentric, corners)


def rasterize(
    xy: np.ndarray, depth: np.ndarray, faces: np.ndarray, rows: int, cols: int, cull_back_faces: bool = False
) -> Raster:
    """Rasterise triangles given in pixel coordinates.

    Args:
        xy: (V, 2) float64 vertex positions, x = column and y = row in pixels (pixel centres at
            half-integers).
        depth: (V,) float64 vertex depth; smaller is nearer.
        faces: (F, 3) int64 0-based vertex indices.
        rows, cols: output size.
        cull_back_faces: skip triangles with signed area >= 0 in these (x right, y down)
            pixel coordinates: for faces wound counter-clockwise seen from outside (as the
            synthetic head's are) those are the ones seen from behind. For a closed surface
            seen from outside the nearest surface along every ray is front-facing, so this
            changes no pixel (up to ties on silhouette edges) and halves the work; nvdiffrast
            itself culls nothing.

    Returns:
        The nearest covering triangle of every covered pixel. Exact depth ties (a pixel centre
        on an edge shared at equal depth) go to the lower triangle index.
    """
    x = [xy[faces[:, k], 0] for k in range(3)]
    y = [xy[faces[:, k], 1] for k in range(3)]
    z = [depth[faces[:, k]] for k in range(3)]
    # Pixel j is a candidate when its centre j + 0.5 lies inside the box [min, max].
    col0 = np.maximum(np.ceil(np.minimum(np.minimum(x[0], x[1]), x[2]) - 0.5), 0).astype(np.int64)
    col1 = np.minimum(np.floor(np.maximum(np.maximum(x[0], x[1]), x[2]) - 0.5), cols - 1).astype(np.int64)
    row0 = np.maximum(np.ceil(np.minimum(np.minimum(y[0], y[1]), y[2]) - 0.5), 0).astype(np.int64)
    row1 = np.minimum(np.floor(np.maximum(np.maximum(y[0], y[1]), y[2]) - 0.5), rows - 1).astype(np.int64)
    width, height = col1 - col0 + 1, row1 - row0 + 1
    e1x, e1y, e2x, e2y = x[1] - x[0], y[1] - y[0], x[2] - x[0], y[2] - y[0]
    area = e1x * e2y - e1y * e2x
    facing = area < -1e-12 if cull_back_faces else np.abs(area) > 1e-12
    keep = np.flatnonzero((width > 0) & (height > 0) & facing)
    col0, row0, width, height = col0[keep], row0[keep], width[keep], height[keep]
    e1x, e1y, e2x, e2y, inverse = e1x[keep], e1y[keep], e2x[keep], e2y[keep], 1.0 / area[keep]

    # Barycentrics b1, b2 and depth are affine in the pixel offset (row i, column j) inside each
    # bounding box: value = origin + j * step_col + i * step_row, kept as that triple.
    # Evaluating them from the box corner keeps the arithmetic well conditioned at large pixel
    # coordinates.
    dx = col0 + 0.5 - x[0][keep]
    dy = row0 + 0.5 - y[0][keep]
    b1 = ((dx * e2y - dy * e2x) * inverse, e2y * inverse, -e2x * inverse)
    b2 = ((dy * e1x - dx * e1y) * inverse, -e1y * inverse, e1x * inverse)
    z0, dz1, dz2 = z[0][keep], z[1][keep] - z[0][keep], z[2][keep] - z[0][keep]
    zs = tuple((z0 if k == 0 else 0.0) + dz1 * b1[k] + dz2 * b2[k] for k in range(3))
    # One row per quantity, one column per kept triangle, so each chunk slices contiguous rows.
    table = np.stack([*b1, *b2, *zs, width.astype(np.float64), keep, row0 * cols + col0])
    count = width * height

    best_depth = np.full(rows * cols, np.inf)
    best_face = np.full(rows * cols, -1, dtype=np.int64)
    best_b = np.zeros((rows * cols, 2))
    scratch = np.empty(rows * cols, dtype=np.int64)
    ends = np.cumsum(count)
    start = 0
    while start < keep.size:
        # Whole triangles per chunk; a single huge triangle still forms a chunk of its own.
        base = ends[start - 1] if start > 0 else 0
        stop = max(int(np.searchsorted(ends, base + _CHUNK_CANDIDATES, side="right")), start + 1)
        _resolve_chunk(table[:, start:stop], count[start:stop], cols, best_depth, best_face, best_b, scratch)
        start = stop

    pixel = np.flatnonzero(best_face >= 0)
    b = best_b[pixel]
    barycentric = np.stack([1.0 - b[:, 0] - b[:, 1], b[:, 0], b[:, 1]], axis=1)
    return Raster(rows, cols, pixel, best_face[pixel], barycentric, best_depth[pixel])


def _resolve_chunk(table, count, cols, best_depth, best_face, best_b, scratch) -> None:
    """Inside-test the bounding-box pixels of one chunk of triangles; keep the nearest per pixel.

    Chunks come in ascending triangle order, so on an exact depth tie with an earlier chunk the
    earlier (lower-index) triangle keeps the pixel.
    """
    total = int(count.sum())
    local = np.repeat(np.arange(count.size), count)
    offset = np.arange(total, dtype=np.float64) - np.repeat(
        (np.cumsum(count) - count).astype(np.float64), count
    )
    width = table[9][local]
    # Float division is exact here (offsets are small integers and the +0.5 keeps quotients
    # away from integers) and much faster than int64 division.
    row = np.floor((offset + 0.5) / width)
    col = offset - row * width
    b1 = table[0][local] + col * table[1][local] + row * table[2][local]
    b2 = table[3][local] + col * table[4][local] + row * table[5][local]
    inside = np.flatnonzero((b1 >= 0.0) & (b2 >= 0.0) & (b1 + b2 <= 1.0))
    local, row, col, b1, b2 = local[inside], row[inside], col[inside], b1[inside], b2[inside]
    z = table[6][local] + col * table[7][local] + row * table[8][local]
    pixel = table[11][local].astype(np.int64) + (row * cols + col).astype(np.int64)

    previous = best_depth[pixel]
    np.minimum.at(best_depth, pixel, z)
    win = np.flatnonzero((z == best_depth[pixel]) & (z < previous))
    pixel, local, b1, b2 = pixel[win], local[win], b1[win], b2[win]
    # Exact ties inside the chunk: the lowest triangle wins, so each pixel is written once.
    scratch[pixel] = np.iinfo(np.int64).max
    np.minimum.at(scratch, pixel, local)
    win = np.flatnonzero(local == scratch[pixel])
    pixel = pixel[win]
    best_face[pixel] = table[10][local[win]].astype(np.int64)
    best_b[pixel, 0] = b1[win]
    best_b[pixel, 1] = b2[win]


def sample_bilinear(texture: np.ndarray, uv: np.ndarray, boundary: str = "wrap") -> np.ndarray:
    """Bilinear texture lookup the way nvdiffrast's ``texture(..., filter_mode='linear')`` does.

    Args:
        texture: (H, W, C) array, row 0 at v = 0 (i.e. the PNG flipped vertically).
        uv: (N, 2) float64 coordinates, u along columns and v along rows.
        boundary: ``"wrap"`` (nvdiffrast's default) or ``"clamp"``.

    Returns:
        (N, C) float64 samples in the texture's value range.
    """
    if boundary not in ("wrap", "clamp"):
        raise ValueError(f"boundary must be 'wrap' or 'clamp', got {boundary!r}")
    height, width = texture.shape[:2]
    x = uv[:, 0] * width - 0.5
    y = uv[:, 1] * height - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    if boundary == "wrap":
        xa, xb, ya, yb = x0 % width, (x0 + 1) % width, y0 % height, (y0 + 1) % height
    else:
        xa, xb = np.clip(x0, 0, width - 1), np.clip(x0 + 1, 0, width - 1)
        ya, yb = np.clip(y0, 0, height - 1), np.clip(y0 + 1, 0, height - 1)

    flat = texture.reshape(height * width, -1)

    def texel(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return flat[rows * width + columns].astype(np.float64)

    top = texel(ya, xa) * (1.0 - fx) + texel(ya, xb) * fx
    bottom = texel(yb, xa) * (1.0 - fx) + texel(yb, xb) * fx
    return top * (1.0 - fy) + bottom * fy
