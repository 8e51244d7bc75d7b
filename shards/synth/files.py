"""Byte-exact encodings of the entity's files (reference section 2).

Every writer is deterministic: PNGs use a fixed zlib level and carry no time stamp, text uses
fixed number formats, so the same arrays always give the same bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from shards.synth.cameras import format_numbers
from shards.synth.mesh import HeadTopology

PNG_COMPRESSION = 1
"""zlib level for every PNG: fast, and fixed so that output bytes are reproducible."""


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB image as an 8-bit PNG.

    Args:
        path: destination; parent folders are created.
        image: (H, W, 3) uint8 RGB, row 0 at the top of the picture.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{path}: expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    ok, encoded = cv2.imencode(
        ".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    )
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())


def read_png(path: Path) -> np.ndarray:
    """Read an 8-bit RGB PNG as (H, W, 3) uint8, row 0 at the top."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"{path}: not a readable PNG")
    return np.ascontiguousarray(image[..., ::-1])


def write_texture(path: Path, flipped: np.ndarray) -> None:
    """Write a texture held in the renderer's flipped orientation (row 0 at v = 0)."""
    write_png(path, np.ascontiguousarray(flipped[::-1]))


def write_mesh_bin(path: Path, vertices: np.ndarray) -> None:
    """Write (7306, 3) vertices as little-endian float32 x, y, z (87,672 bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.ascontiguousarray(vertices, dtype="<f4").tobytes())


class ObjWriter:
    """Writes a frame's mesh as OBJ; the ``vt`` and ``f`` lines are shared and encoded once."""

    def __init__(self, topology: HeadTopology):
        uvs = topology.uvs
        self._uv_lines = ("vt %.6f %.6f\n" * len(uvs)) % tuple(uvs.ravel().tolist())
        corners = np.stack([topology.vert_ids + 1, topology.uv_ids + 1], axis=2).reshape(-1)
        self._face_lines = ("f %d/%d %d/%d %d/%d\n" * topology.num_faces) % tuple(corners.tolist())

    def text(self, vertices: np.ndarray) -> str:
        """OBJ text for (V, 3) vertices: ``v`` (4 decimals, mm), ``vt``, then ``f a/b c/d e/f`` (1-based)."""
        vertex_lines = ("v %.4f %.4f %.4f\n" * len(vertices)) % tuple(
            np.asarray(vertices, np.float64).ravel().tolist()
        )
        return vertex_lines + self._uv_lines + self._face_lines

    def write(self, path: Path, vertices: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.text(vertices), encoding="ascii")


@functools.cache
def obj_writer(topology: HeadTopology) -> ObjWriter:
    """The process-wide OBJ writer of a topology (its shared lines are encoded once)."""
    return ObjWriter(topology)


def write_transform(path: Path, pose: np.ndarray) -> None:
    """Write the head pose [R_f | t_f] (3, 4) as three lines of four numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(format_numbers(row) + "\n" for row in pose), encoding="ascii")


def write_frame_list(path: Path, pairs: list[tuple[str, str]]) -> None:
    """Write ``frame_list.txt``: one ``<EXPRESSION> <FRAME>`` per line."""
    path.write_text("".join(f"{expression} {frame}\n" for expression, frame in pairs), encoding="ascii")


def write_scalar(path: Path, value: float) -> None:
    """Write one float (``tex_var.txt``, ``vert_var.txt``)."""
    path.write_text(f"{value:.9g}\n", encoding="ascii")
