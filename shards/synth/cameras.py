"""The synthetic capture rig: camera names, intrinsics, extrinsics and the KRT text.

Cameras sit on a spherical cap in front of the head, about a metre away, looking at it, like
the Multiface dome. Camera names are numeric ids counting up from ``400002``. The first camera
in KRT order (the colour-correction anchor of the seed) is the frontal one.

Every number is rounded before use to what the KRT text stores, so the matrices used for
rendering are exactly the ones a reader parses back from the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.layout import PHOTO_COLS, PHOTO_ROWS

FIRST_CAMERA_ID = 400002
_GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))


@dataclass(frozen=True)
class Camera:
    """One camera of the rig, in the seed's conventions.

    Attributes:
        name: numeric id, e.g. ``"400002"``.
        intrinsic: (3, 3) float64 K, pixels of the photo at its written size.
        distortion: (5,) float64 distortion coefficients (zeros: photos are rendered undistorted).
        extrinsic: (3, 4) float64 [R_C | t_C], world (mm) to camera.
    """

    name: str
    intrinsic: np.ndarray
    distortion: np.ndarray
    extrinsic: np.ndarray

    @property
    def position(self) -> np.ndarray:
        """(3,) float64 camera centre in world coordinates, mm."""
        return -self.extrinsic[:, :3].T @ self.extrinsic[:, 3]

    def projection(self, pose: np.ndarray) -> np.ndarray:
        """The seed's M = K [R_C R_f | R_C t_f + t_C], projecting head-frame vertices to pixels.

        Args:
            pose: (3, 4) float64 head pose [R_f | t_f].

        Returns:
            (3, 4) float64; for a vertex v, p = M [v; 1] gives column p0/p2 and row p1/p2.
        """
        rotation_c, translation_c = self.extrinsic[:, :3], self.extrinsic[:, 3]
        rotation_f, translation_f = pose[:, :3], pose[:, 3]
        view = np.hstack([rotation_c @ rotation_f, (rotation_c @ translation_f + translation_c)[:, None]])
        return self.intrinsic @ view


def _look_at(position: np.ndarray, target: np.ndarray, roll_degrees: float) -> np.ndarray:
    """World-to-camera rotation (3, 3) of an OpenCV camera (x right, y down, z forward)."""
    forward = target - position
    forward /= np.linalg.norm(forward)
    right = np.cross(np.array([0.0, -1.0, 0.0]), forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    roll = np.radians(roll_degrees)
    right, down = np.cos(roll) * right + np.sin(roll) * down, -np.sin(roll) * right + np.cos(roll) * down
    return np.stack([right, down, forward])


def build_rig(seed: int, num_cameras: int, rows: int, cols: int) -> list[Camera]:
    """Place ``num_cameras`` cameras for photos of ``rows`` x ``cols`` pixels.

    Focal lengths are drawn for the real 2048 x 1334 sensor and scaled with the photo size
    (square pixels), so a small photo of the real aspect shows the same field of view.

    Returns:
        Cameras in KRT order (ascending id); index 0 looks at the face head-on.
    """
    rng = np.random.default_rng([seed, 201])
    ids = FIRST_CAMERA_ID + np.concatenate([[0], np.cumsum(rng.integers(1, 4, num_cameras - 1))])
    # Square pixels, scaled so the real field of view fits the smaller of the two ratios.
    scale = min(cols / PHOTO_COLS, rows / PHOTO_ROWS)
    cameras = []
    for index in range(num_cameras):
        # A sunflower spiral spreads any number of cameras evenly over the cap, starting at the face.
        radius = np.sqrt(index / num_cameras)
        angle = index * _GOLDEN_ANGLE
        azimuth = np.radians(75.0 * radius * np.cos(angle) + rng.uniform(-3.0, 3.0))
        elevation = np.radians(8.0 + 30.0 * radius * np.sin(angle) + rng.uniform(-2.0, 2.0))
        distance = rng.uniform(1000.0, 1150.0)
        position = distance * np.array(
            [np.cos(elevation) * np.sin(azimuth), np.sin(elevation), np.cos(elevation) * np.cos(azimuth)]
        )
        target = rng.uniform(-8.0, 8.0, 3)
        rotation = _look_at(position, target, rng.uniform(-2.0, 2.0))
        focal = rng.uniform(5200.0, 6200.0)
        centre = np.array([cols / 2.0, rows / 2.0]) + rng.uniform(-25.0, 25.0, 2) * scale
        intrinsic = np.array([[focal * scale, 0.0, centre[0]], [0.0, focal * scale, centre[1]], [0, 0, 1.0]])
        extrinsic = np.hstack([np.round(rotation, 9), np.round(-rotation @ position, 4)[:, None]])
        cameras.append(
            Camera(
                name=str(int(ids[index])),
                intrinsic=np.round(intrinsic, 4) + 0.0,
                distortion=np.zeros(5),
                extrinsic=extrinsic + 0.0,
            )
        )
    return cameras


def format_numbers(values: np.ndarray) -> str:
    """One text line of numbers that parses back to exactly ``values`` (shortest repr)."""
    return " ".join(repr(float(value) + 0.0) for value in np.asarray(values, dtype=np.float64).ravel())


def krt_text(cameras: list[Camera]) -> str:
    """The KRT file (reference section 2.1) for ``cameras``, in their order."""
    lines: list[str] = []
    for camera in cameras:
        lines.append(camera.name)
        lines.extend(format_numbers(row) for row in camera.intrinsic)
        lines.append(format_numbers(camera.distortion))
        lines.extend(format_numbers(row) for row in camera.extrinsic)
        lines.append("")
    return "\n".join(lines) + "\n"
