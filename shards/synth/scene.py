"""One synthetic entity's scene, and everything written for one of its frames.

A :class:`Scene` holds what every frame shares (topology, rest head, deformation modes, rig,
chart texels, colours, motions). :func:`write_frame` generates one (expression, frame): the
mesh files, the per-view and average textures and the photos.

Photos are rendered from exactly what is on disk (float32 vertices, the transform and KRT
numbers as parsed, OBJ UVs, uint8 per-view textures), with the seed's projection and
nvdiffrast's rasterisation and sampling rules, so re-rendering the ground truth reproduces
them. The renderer's coverage is 0 on the background, so the screen loss compares covered
pixels only; the constant grey backdrop never enters it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.layout import EntityLayout
from shards.synth import motion
from shards.synth.cameras import Camera, build_rig
from shards.synth.capture import CapturePlan, capture_plan
from shards.synth.config import SynthConfig
from shards.synth.files import (
    ObjWriter,
    obj_writer,
    write_mesh_bin,
    write_png,
    write_texture,
    write_transform,
)
from shards.synth.mesh import HeadTopology, build_topology, face_normals, rest_shape
from shards.synth.raster import Raster, rasterize, sample_bilinear
from shards.synth.textures import (
    AlbedoModel,
    AverageTexture,
    TexelGeometry,
    scatter,
    skin_palette,
    texel_geometry,
    visible_texels,
)

BACKGROUND = np.array([28, 28, 28], dtype=np.uint8)
"""Photo colour where no triangle covers the pixel (the renderer's coverage is 0 there)."""

MIN_VISIBILITY_ROWS = 2
"""The visibility depth buffer has at least this many rows per texel of texture size."""


@dataclass(frozen=True)
class Scene:
    """Everything the frames of one entity share; deterministic in its config."""

    config: SynthConfig
    plan: CapturePlan
    topology: HeadTopology
    rest: np.ndarray
    basis: np.ndarray
    cameras: list[Camera]
    geometry: TexelGeometry
    albedo: AlbedoModel
    motions: list[motion.ExpressionMotion]
    obj: ObjWriter

    @classmethod
    def build(cls, config: SynthConfig) -> Scene:
        plan = capture_plan(config.seed, config.num_expressions, config.num_frames)
        topology = build_topology()
        identity = np.random.default_rng([config.seed, 2]).uniform(-1.0, 1.0, 4)
        rest = rest_shape(topology, identity)
        geometry = texel_geometry(topology, config.tex_size)
        return cls(
            config=config,
            plan=plan,
            topology=topology,
            rest=rest,
            basis=motion.deformation_basis(topology, rest),
            cameras=build_rig(config.seed, config.num_cameras, config.photo_rows, config.photo_cols),
            geometry=geometry,
            albedo=AlbedoModel(geometry, skin_palette(config.seed)),
            motions=[
                motion.expression_motion(config.seed, i, name) for i, name in enumerate(plan.expressions)
            ],
            obj=obj_writer(topology),
        )

    def coefficients(self, expression_index: int, frame_index: int) -> np.ndarray:
        """Expression coefficients (5,) float64 of a frame."""
        return motion.coefficients(self.motions[expression_index], frame_index)

    def vertices(self, expression_index: int, frame_index: int) -> np.ndarray:
        """Mesh (7306, 3) float32 of a frame, head frame, mm (as written to the .bin)."""
        coefficient = self.coefficients(expression_index, frame_index)
        return motion.deform(self.rest, self.basis, coefficient).astype(np.float32)

    def pose(self, expression_index: int, frame_index: int) -> np.ndarray:
        """Head pose [R_f | t_f] (3, 4) float64 of a frame."""
        return motion.head_pose(self.motions[expression_index], frame_index)


def project(vertices: np.ndarray, projection: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project head-frame vertices to pixels.

    Args:
        vertices: (V, 3) float64.
        projection: (3, 4) float64 M.

    Returns:
        xy: (V, 2) float64, x = p0/p2 (column), y = p1/p2 (row).
        depth: (V,) float64 p2 (mm along the optical axis).
    """
    projected = vertices @ projection[:, :3].T + projection[:, 3]
    return projected[:, :2] / projected[:, 2:3], projected[:, 2]


def shade(raster: Raster, topology: HeadTopology, texture: np.ndarray) -> np.ndarray:
    """Photo from a raster and a texture, as nvdiffrast's interpolate + texture would give it.

    Args:
        raster: the mesh rasterised at photo size.
        topology: UVs and uv_ids.
        texture: (T, T, 3) uint8 per-view texture, flipped (row 0 at v = 0).

    Returns:
        (rows, cols, 3) uint8: round(bilinear sample) where covered, ``BACKGROUND`` elsewhere.
    """
    uv = raster.interpolate(topology.uvs, topology.uv_ids)
    colour = np.rint(sample_bilinear(texture, uv)).astype(np.uint8)
    photo = np.empty((raster.rows * raster.cols, 3), dtype=np.uint8)
    photo[:] = BACKGROUND
    photo[raster.pixel] = colour
    return photo.reshape(raster.rows, raster.cols, 3)


def write_frame(scene: Scene, layout: EntityLayout, expression_index: int, frame_index: int) -> None:
    """Generate and write every file of one (expression, frame)."""
    config, topology = scene.config, scene.topology
    expression = scene.plan.expressions[expression_index]
    frame = scene.plan.frames[expression_index][frame_index]
    vertices32 = scene.vertices(expression_index, frame_index)
    pose = scene.pose(expression_index, frame_index)
    write_mesh_bin(layout.mesh_bin(expression, frame), vertices32)
    scene.obj.write(layout.mesh_obj(expression, frame), vertices32)
    write_transform(layout.transform(expression, frame), pose)

    vertices = vertices32.astype(np.float64)
    geometry = scene.geometry
    points = geometry.points(vertices, topology.vert_ids)
    normals = face_normals(vertices, topology.vert_ids)[geometry.triangle]
    colours = scene.albedo(scene.coefficients(expression_index, frame_index))
    rows, cols = config.photo_rows, config.photo_cols
    scale = max(1, -(-MIN_VISIBILITY_ROWS * config.tex_size // rows))

    average = AverageTexture(config.tex_size)
    for camera in scene.cameras:
        projection = camera.projection(pose)
        xy, depth = project(vertices, projection)
        # The head is closed and seen from outside, so culling back faces changes no pixel.
        raster = rasterize(xy, depth, topology.vert_ids, rows, cols, cull_back_faces=True)
        # Visibility needs a depth buffer about as fine as the texels; reuse the photo's when
        # it is, otherwise rasterise a finer one.
        fine = raster
        if scale > 1:
            fine = rasterize(
                xy * scale, depth, topology.vert_ids, rows * scale, cols * scale, cull_back_faces=True
            )
        camera_in_head = pose[:, :3].T @ (camera.position - pose[:, 3])
        seen = visible_texels(
            points,
            normals,
            projection,
            camera_in_head,
            fine.depth_map(),
            scale,
            camera.intrinsic[1, 1] * scale,
        )
        texture = scatter(geometry, colours, seen)
        average.add(texture)
        write_texture(layout.texture(expression, camera.name, frame), texture)
        write_png(layout.photo(expression, camera.name, frame), shade(raster, topology, texture))
    write_texture(layout.average_texture(expression, frame), average.result())
