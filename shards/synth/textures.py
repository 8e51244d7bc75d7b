"""Albedo, per-view and average textures of the synthetic head.

Texture arrays here are in the seed's *flipped* orientation (row 0 at v = 0, the bottom of the
PNG), because that is how the renderer samples them; they are flipped back only when written.

* The albedo is a smooth procedural skin/hair/eyes/lips pattern that follows the surface
  (it is a function of the rest-head angles) and changes with the expression coefficients
  (blush with puffed cheeks, forehead wrinkles with raised brows, deeper lips when pursed).
  Its values are >= 1, so 0 always means "unseen".
* A per-view texture holds the albedo where its camera sees the texel (the surface faces the
  camera and passes a depth test against the camera's depth buffer) and 0 elsewhere.
* The average texture is the mean of the per-view textures over the cameras that see each
  texel, 0 where none does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from shards.synth.mesh import HeadTopology, angles_of_uv, surface_bump
from shards.synth.raster import rasterize


@dataclass(frozen=True, eq=False)
class TexelGeometry:
    """Where each texel of the chart lies on the mesh (the same for every frame).

    Attributes:
        size: texture size T.
        texel: (N,) int64 flat index into the flipped (T, T) texture of every chart texel.
        triangle: (N,) int64 triangle containing the texel centre.
        barycentric: (N, 3) float64 weights of the triangle's corners (linear in UV, which is
            exact for a texture mapped affinely on each triangle).
        polar, azimuth: (N,) float64 rest-head angles of the texel, radians.
        polar_of_row: (T,) float64 polar angle of each texture row (the chart maps rows to
            polar angle and columns to azimuth, independently).
        azimuth_of_column: (T,) float64 azimuth of each texture column.
    """

    size: int
    texel: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray
    polar: np.ndarray
    azimuth: np.ndarray
    polar_of_row: np.ndarray
    azimuth_of_column: np.ndarray

    def bump(self, centre: tuple[float, float], width: tuple[float, float], gain: float = 1.0) -> np.ndarray:
        """``gain * surface_bump`` at every chart texel, clipped to [0, 1]: (N, 1) float64.

        A Gaussian in (polar, azimuth) factorises into a row term times a column term, so this
        costs O(T) exponentials instead of O(T^2).
        """
        row_term = surface_bump(
            self.polar_of_row, np.radians(centre[1]) + 0.0 * self.polar_of_row, centre, width
        )
        column_term = surface_bump(
            np.radians(centre[0]) + 0.0 * self.azimuth_of_column, self.azimuth_of_column, centre, width
        )
        weight = row_term[self.texel // self.size] * column_term[self.texel % self.size]
        return np.clip(gain * weight, 0.0, 1.0)[:, None]

    def points(self, vertices: np.ndarray, vert_ids: np.ndarray) -> np.ndarray:
        """(N, 3) float64 surface position of every chart texel for mesh ``vertices`` (V, 3)."""
        corners = vertices[vert_ids[self.triangle]]
        return np.einsum("nk,nkc->nc", self.barycentric, corners)


@functools.lru_cache(maxsize=4)
def texel_geometry(topology: HeadTopology, size: int) -> TexelGeometry:
    """Rasterise the UV chart at ``size`` x ``size`` texels (cached: tests build many entities)."""
    # UV triangles do not overlap, so a constant depth is enough.
    raster = rasterize(topology.uvs * size, np.zeros(len(topology.uvs)), topology.uv_ids, size, size)
    centre = (np.arange(size) + 0.5) / size
    polar_of_row, azimuth_of_column = angles_of_uv(np.stack([centre, centre], axis=1))
    polar, azimuth = polar_of_row[raster.pixel // size], azimuth_of_column[raster.pixel % size]
    arrays = (
        raster.pixel,
        raster.triangle,
        raster.barycentric,
        polar,
        azimuth,
        polar_of_row,
        azimuth_of_column,
    )
    for array in arrays:
        array.setflags(write=False)
    return TexelGeometry(size, *arrays)


@dataclass(frozen=True)
class SkinPalette:
    """Colours that differ between entities: skin (3,), hair (3,), iris (3,) float64 RGB."""

    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray


def skin_palette(seed: int) -> SkinPalette:
    """Draw an entity's colours reproducibly from its seed."""
    rng = np.random.default_rng([seed, 301])
    tone = rng.uniform(0.7, 1.05)
    skin = np.array([216.0, 168.0, 144.0]) * tone
    hair = np.array([70.0, 50.0, 36.0]) * rng.uniform(0.6, 1.6)
    iris = rng.choice(np.array([[70.0, 100.0, 135.0], [90.0, 65.0, 40.0], [80.0, 110.0, 70.0]]))
    return SkinPalette(skin, hair, iris)


class AlbedoModel:
    """The procedural albedo of one entity's chart texels.

    Everything that does not move with the expression is evaluated once here; a frame then
    only adds its expression terms. The features (brows, eyes, nostrils, lips) are painted over
    the skin with ``mix``; as those are linear, the stack folds into
    ``colour = skin * keep + painted + lips * lip_weight``.
    """

    def __init__(self, geometry: TexelGeometry, palette: SkinPalette):
        polar, azimuth = geometry.polar, geometry.azimuth
        bump = geometry.bump

        shade = 1.0 + 0.05 * np.sin(3.0 * azimuth) * np.cos(2.0 * polar)
        pores = 6.0 * np.sin(28.0 * polar) * np.sin(28.0 * azimuth)
        skin = palette.skin[None, :] * shade[:, None] + pores[:, None]
        # Hair on top and at the back; strands are a mid-frequency pattern along the azimuth.
        degrees_p, degrees_a = np.degrees(polar), np.degrees(azimuth)
        top = 1.0 / (1.0 + np.exp((degrees_p - 52.0) / 4.0))
        back = (
            1.0
            / (1.0 + np.exp((118.0 - np.abs(degrees_a)) / 6.0))
            / (1.0 + np.exp((degrees_p - 125.0) / 6.0))
        )
        hair = np.maximum(top, back)[:, None]
        strands = palette.hair[None, :] + 14.0 * np.sin(55.0 * azimuth)[:, None]
        self._skin = skin * (1.0 - hair) + strands * hair
        self._blush = bump((103.0, 38.0), (8.0, 10.0)) + bump((103.0, -38.0), (8.0, 10.0))
        self._wrinkles = bump((67.0, 0.0), (7.0, 28.0)) * (0.5 + 0.5 * np.sin(90.0 * polar))[:, None]

        features: list[tuple[np.ndarray | list[float], np.ndarray]] = []
        for side in (-1.0, 1.0):
            features.append(([95.0, 64.0, 48.0], bump((79.0, 21.0 * side), (2.0, 9.0), 1.6)))  # brow
            features.append(([240.0, 236.0, 230.0], bump((88.0, 20.0 * side), (2.4, 5.5), 1.8)))  # sclera
            features.append((palette.iris, bump((88.0, 20.0 * side), (1.4, 2.2), 2.0)))
            features.append(([22.0, 18.0, 18.0], bump((88.0, 20.0 * side), (0.6, 0.9), 2.0)))  # pupil
            features.append(([120.0, 76.0, 68.0], bump((104.0, 4.5 * side), (1.2, 2.0), 1.5)))  # nostril
        keep = np.ones((polar.size, 1))
        painted = np.zeros((polar.size, 3))
        for target, weight in features:
            painted = painted * (1.0 - weight) + np.asarray(target)[None, :] * weight
            keep = keep * (1.0 - weight)
        self._lip_weight = bump((117.5, 0.0), (2.6, 12.0), 1.5)
        self._keep = keep * (1.0 - self._lip_weight)
        self._painted = painted * (1.0 - self._lip_weight)

    def __call__(self, coefficient: np.ndarray) -> np.ndarray:
        """Albedo of every chart texel for one frame.

        Args:
            coefficient: (5,) float64 expression coefficients (``motion.MODES`` order): puffed
                cheeks blush, raised brows wrinkle the forehead, pursed lips darken.

        Returns:
            (N, 3) uint8 RGB, every value in [1, 255].
        """
        skin = self._skin + coefficient[1] * self._blush * np.array([34.0, -14.0, -12.0])
        skin = skin - 40.0 * max(float(coefficient[3]), 0.0) * self._wrinkles
        lips = np.array([178.0, 78.0, 84.0]) * (1.0 - 0.2 * min(float(coefficient[2]), 1.0))
        colour = skin * self._keep + self._painted + lips[None, :] * self._lip_weight
        return np.clip(np.rint(colour), 1.0, 255.0).astype(np.uint8)


def visible_texels(
    points: np.ndarray,
    normals: np.ndarray,
    projection: np.ndarray,
    camera_position: np.ndarray,
    depth_map: np.ndarray,
    scale: int,
    focal: float,
) -> np.ndarray:
    """Which chart texels one camera sees.

    Args:
        points: (N, 3) float64 texel positions, head frame, mm.
        normals: (N, 3) float64 outward normals of the texels' triangles.
        projection: (3, 4) float64 M of the camera for this frame (head frame to pixels).
        camera_position: (3,) float64 camera centre in the head frame.
        depth_map: (rows * scale, cols * scale) float64 depth buffer of the mesh rendered with
            ``scale`` x the photo resolution, +inf where empty.
        scale: integer upsampling of the depth buffer over the photo.
        focal: vertical focal length of the depth buffer, pixels (sets the depth tolerance).

    Returns:
        (N,) bool.
    """
    projected = points @ projection[:, :3].T + projection[:, 3]
    depth = projected[:, 2]
    column = np.floor(projected[:, 0] / depth * scale).astype(np.int64)
    row = np.floor(projected[:, 1] / depth * scale).astype(np.int64)
    rows, cols = depth_map.shape
    inside = (depth > 0) & (column >= 0) & (column < cols) & (row >= 0) & (row < rows)
    facing = np.einsum("nc,nc->n", normals, camera_position[None, :] - points) > 0.0
    nearest = np.full(points.shape[0], np.inf)
    nearest[inside] = depth_map[row[inside], column[inside]]
    # The buffer holds the depth at the pixel centre, not at the texel: allow for the surface
    # slope across a couple of pixels (one pixel spans depth / focal mm).
    tolerance = 1.0 + 2.5 * depth / focal
    return inside & facing & (depth <= nearest + tolerance)


def scatter(geometry: TexelGeometry, values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Place per-texel values into a flipped (T, T, 3) uint8 texture, 0 off-chart or off-mask.

    Args:
        geometry: the chart texels.
        values: (N, 3) uint8 values of the chart texels.
        mask: optional (N,) bool; texels outside it stay 0.
    """
    texture = np.zeros((geometry.size * geometry.size, 3), dtype=np.uint8)
    if mask is None:
        texture[geometry.texel] = values
    else:
        texture[geometry.texel[mask]] = values[mask]
    return texture.reshape(geometry.size, geometry.size, 3)


class AverageTexture:
    """Running mean of per-view textures over the views that see each texel.

    Accumulates one view at a time, so a 160-camera rig never holds 160 textures in memory.
    """

    def __init__(self, size: int):
        self._total = np.zeros((size, size, 3), dtype=np.int64)
        self._seen = np.zeros((size, size), dtype=np.int64)

    def add(self, texture: np.ndarray) -> None:
        """Add one (T, T, 3) uint8 per-view texture (0 where unseen)."""
        self._total += texture
        self._seen += texture.any(axis=2)

    def result(self) -> np.ndarray:
        """(T, T, 3) uint8 rounded mean, 0 where no view sees the texel."""
        mean = np.rint(self._total / np.maximum(self._seen, 1)[..., None])
        return np.where(self._seen[..., None] > 0, mean, 0).astype(np.uint8)
