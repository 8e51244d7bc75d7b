"""The synthetic head: a closed 7306-vertex surface with a real, non-overlapping UV chart.

The surface is a latitude/longitude grid (83 rings of 88 vertices plus two poles, which is
exactly the 7306 vertices of the Multiface tracked mesh) bent into a head: an ellipsoid with a
nose, brow ridge, eye sockets, cheekbones, chin, ears and a narrowing neck. The UV chart
unrolls the grid with the seam at the back of the head, so the face sits in the middle of the
texture, upright in the PNG, as in the real ``unwrapped_uv_1024`` textures. Because UV
coordinates duplicate at the seam and around the poles, the OBJ has more ``vt`` than ``v``
lines and ``uv_ids`` differ from ``vert_ids``, which exercises the same code paths as the real
topology.

Units are millimetres; the head frame has +y up and the face looking along +z.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from shards.layout import NUM_VERTICES

NUM_RINGS = 83
NUM_SEGMENTS = 88
assert NUM_RINGS * NUM_SEGMENTS + 2 == NUM_VERTICES

UV_MARGIN = 0.02
"""Gap between the chart and the texture border, in UV units.

At the smallest supported texture (32 texels) this is more than half a texel, so a bilinear
lookup never reaches across the border: nvdiffrast's default 'wrap' addressing and 'clamp'
addressing then give identical results.
"""

TOP_POLE = NUM_RINGS * NUM_SEGMENTS
BOTTOM_POLE = TOP_POLE + 1

# Azimuth is denser at the front than at the back (slope 0.5 at the face, 2 at the seam), so
# the face gets twice the vertices and twice the texels of a uniform grid.
_AZIMUTH_FRONT_SLOPE = 0.5


def azimuth_of_column(t: np.ndarray) -> np.ndarray:
    """Map a normalised chart column ``t`` in [-1, 1] to an azimuth in radians (0 = face)."""
    a = _AZIMUTH_FRONT_SLOPE
    return np.pi * t * (a + (1.0 - a) * t * t)


def angles_of_uv(uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface angles of UV coordinates on the rest head.

    Args:
        uv: (N, 2) float64, OBJ convention (v = 0 at the bottom of the PNG).

    Returns:
        polar: (N,) float64 radians from the top of the head (0) to the neck (pi).
        azimuth: (N,) float64 radians, 0 at the face, positive towards +x.
    """
    scale = 1.0 - 2.0 * UV_MARGIN
    t = (uv[:, 0] - UV_MARGIN) / scale * 2.0 - 1.0
    polar = (1.0 - UV_MARGIN - uv[:, 1]) / scale * np.pi
    return np.clip(polar, 0.0, np.pi), azimuth_of_column(np.clip(t, -1.0, 1.0))


@dataclass(frozen=True, eq=False)
class HeadTopology:
    """Connectivity and UV chart shared by every frame of every entity.

    Attributes:
        uvs: (Nuv, 2) float64 texture coordinates exactly as written in the OBJ (6 decimals).
        vert_ids: (F, 3) int64 0-based vertex indices, counter-clockwise seen from outside.
        uv_ids: (F, 3) int64 0-based indices into ``uvs``.
        polar: (7306,) float64 polar angle of each vertex on the rest head, radians.
        azimuth: (7306,) float64 azimuth of each vertex, radians (0 = face).
    """

    uvs: np.ndarray
    vert_ids: np.ndarray
    uv_ids: np.ndarray
    polar: np.ndarray
    azimuth: np.ndarray

    @property
    def num_faces(self) -> int:
        return int(self.vert_ids.shape[0])


@functools.cache
def build_topology() -> HeadTopology:
    """The grid topology and its UV chart (deterministic, no seed; built once per process).

    The arrays are read-only because every caller shares them.
    """
    rings = np.arange(NUM_RINGS)
    segments = np.arange(NUM_SEGMENTS)
    ring_polar = np.pi * (rings + 1) / (NUM_RINGS + 1)
    segment_azimuth = azimuth_of_column(2.0 * segments / NUM_SEGMENTS - 1.0)
    polar = np.concatenate([np.repeat(ring_polar, NUM_SEGMENTS), [0.0, np.pi]])
    azimuth = np.concatenate([np.tile(segment_azimuth, NUM_RINGS), [0.0, 0.0]])

    # UV grid: one more column than segments, because the seam vertex needs u=0 and u=1.
    scale = 1.0 - 2.0 * UV_MARGIN
    column_u = UV_MARGIN + scale * np.arange(NUM_SEGMENTS + 1) / NUM_SEGMENTS
    ring_v = 1.0 - UV_MARGIN - scale * ring_polar / np.pi
    grid_uv = np.stack(np.broadcast_arrays(column_u[None, :], ring_v[:, None]), axis=-1).reshape(-1, 2)
    # Each pole triangle gets its own pole UV under the middle of its segment, so the fan
    # unrolls into a row of non-overlapping triangles instead of collapsing to a point.
    mid_u = UV_MARGIN + scale * (segments + 0.5) / NUM_SEGMENTS
    top_uv = np.stack([mid_u, np.full(NUM_SEGMENTS, 1.0 - UV_MARGIN)], axis=1)
    bottom_uv = np.stack([mid_u, np.full(NUM_SEGMENTS, UV_MARGIN)], axis=1)
    raw_uvs = np.concatenate([grid_uv, top_uv, bottom_uv])
    # The OBJ stores 6 decimals; keep exactly what a reader will parse so that photos rendered
    # here and renders made from the files agree to the last bit of the UVs.
    text = ("%.6f " * raw_uvs.size) % tuple(raw_uvs.ravel().tolist())
    uvs = np.array(text.split(), dtype=np.float64).reshape(-1, 2)

    def vertex(ring: np.ndarray | int, segment: np.ndarray) -> np.ndarray:
        return ring * NUM_SEGMENTS + segment % NUM_SEGMENTS

    def grid_uv_index(ring: np.ndarray | int, column: np.ndarray) -> np.ndarray:
        return ring * (NUM_SEGMENTS + 1) + column

    ring_grid, segment_grid = np.meshgrid(np.arange(NUM_RINGS - 1), segments, indexing="ij")
    ring, segment = ring_grid.ravel(), segment_grid.ravel()
    a, b = vertex(ring, segment), vertex(ring + 1, segment)
    c, d = vertex(ring + 1, segment + 1), vertex(ring, segment + 1)
    ua, ub = grid_uv_index(ring, segment), grid_uv_index(ring + 1, segment)
    uc, ud = grid_uv_index(ring + 1, segment + 1), grid_uv_index(ring, segment + 1)
    # (a, b, d) and (b, c, d): b - a points down the head and d - a towards +azimuth, whose
    # cross product is the outward normal.
    quad_vert = np.concatenate([np.stack([a, b, d], 1), np.stack([b, c, d], 1)])
    quad_uv = np.concatenate([np.stack([ua, ub, ud], 1), np.stack([ub, uc, ud], 1)])

    num_grid_uv = NUM_RINGS * (NUM_SEGMENTS + 1)
    top_vert = np.stack([np.full(NUM_SEGMENTS, TOP_POLE), vertex(0, segments), vertex(0, segments + 1)], 1)
    top_uvi = np.stack(
        [num_grid_uv + segments, grid_uv_index(0, segments), grid_uv_index(0, segments + 1)], 1
    )
    last = NUM_RINGS - 1
    bottom_vert = np.stack(
        [vertex(last, segments), np.full(NUM_SEGMENTS, BOTTOM_POLE), vertex(last, segments + 1)], 1
    )
    bottom_uvi = np.stack(
        [
            grid_uv_index(last, segments),
            num_grid_uv + NUM_SEGMENTS + segments,
            grid_uv_index(last, segments + 1),
        ],
        1,
    )
    vert_ids = np.concatenate([top_vert, quad_vert, bottom_vert]).astype(np.int64)
    uv_ids = np.concatenate([top_uvi, quad_uv, bottom_uvi]).astype(np.int64)
    for array in (uvs, vert_ids, uv_ids, polar, azimuth):
        array.setflags(write=False)
    return HeadTopology(uvs=uvs, vert_ids=vert_ids, uv_ids=uv_ids, polar=polar, azimuth=azimuth)


def surface_bump(
    polar: np.ndarray, azimuth: np.ndarray, centre: tuple[float, float], width: tuple[float, float]
):
    """Smooth Gaussian weight on the sphere of angles.

    Args:
        polar, azimuth: (N,) float64 angles in radians.
        centre: (polar, azimuth) of the peak, degrees.
        width: standard deviations along (polar, azimuth), degrees.

    Returns:
        (N,) float64 weights in [0, 1].
    """
    dp = (np.degrees(polar) - centre[0]) / width[0]
    # Wrap the azimuth difference so that bumps near the back stay continuous over the seam.
    da = ((np.degrees(azimuth) - centre[1] + 180.0) % 360.0 - 180.0) / width[1]
    return np.exp(-0.5 * (dp * dp + da * da))


def rest_shape(topology: HeadTopology, identity: np.ndarray) -> np.ndarray:
    """Neutral head of one entity.

    Args:
        topology: the shared grid.
        identity: (4,) float64 in [-1, 1] that varies proportions between entities
            (width, height, depth, nose size).

    Returns:
        (7306, 3) float64 vertex positions in mm, head frame (+y up, face along +z).
    """
    polar, azimuth = topology.polar, topology.azimuth
    direction = np.stack([np.sin(polar) * np.sin(azimuth), np.cos(polar), np.sin(polar) * np.cos(azimuth)], 1)
    radii = np.array([76.0, 108.0, 94.0]) * (1.0 + 0.05 * identity[:3])
    # The lower head narrows into a neck; smoothstep keeps the surface smooth.
    below = np.clip((np.degrees(polar) - 120.0) / 45.0, 0.0, 1.0)
    horizontal = 1.0 - 0.32 * below * below * (3.0 - 2.0 * below)
    position = direction * radii
    position[:, 0] *= horizontal
    position[:, 2] *= horizontal
    position[:, 1] -= 18.0 * below  # the neck hangs a little lower than an ellipsoid would

    def add(weight: np.ndarray, offset: np.ndarray | float) -> None:
        nonlocal position
        if np.ndim(offset) == 0:
            position = position + weight[:, None] * offset * direction
        else:
            position = position + weight[:, None] * np.asarray(offset)[None, :]

    nose = 1.0 + 0.15 * identity[3]
    add(surface_bump(polar, azimuth, (100.0, 0.0), (9.0, 6.0)), np.array([0.0, -2.0, 20.0 * nose]))
    add(surface_bump(polar, azimuth, (80.0, 0.0), (4.0, 26.0)), 4.0)  # brow ridge
    for side in (-1.0, 1.0):
        add(surface_bump(polar, azimuth, (88.0, 20.0 * side), (5.0, 7.0)), -5.0)  # eye sockets
        add(surface_bump(polar, azimuth, (100.0, 38.0 * side), (8.0, 12.0)), 4.0)  # cheekbones
        add(surface_bump(polar, azimuth, (92.0, 90.0 * side), (8.0, 6.0)), 9.0)  # ears
    add(surface_bump(polar, azimuth, (134.0, 0.0), (6.0, 14.0)), np.array([0.0, 0.0, 7.0]))  # chin
    add(surface_bump(polar, azimuth, (117.0, 0.0), (4.0, 13.0)), np.array([0.0, 0.0, 4.0]))  # lips
    return position


def face_normals(vertices: np.ndarray, vert_ids: np.ndarray) -> np.ndarray:
    """Unit outward normals of the triangles.

    Args:
        vertices: (V, 3) float64 positions.
        vert_ids: (F, 3) int64 0-based triangle corners.

    Returns:
        (F, 3) float64 unit normals (zero for degenerate triangles).
    """
    corners = vertices[vert_ids]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    return normal / np.where(length > 0.0, length, 1.0)
