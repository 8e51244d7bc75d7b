"""How the synthetic face moves: expression deformation and head pose over time.

Each frame's mesh is the rest head plus a weighted sum of a few smooth, localised deformation
modes (jaw, cheeks, lips, brows, smile). The weights are raised-cosine functions of time whose
amplitudes depend on the expression's name (``E057_Cheeks_Puffed`` mostly puffs the cheeks), so
a VAE has a low-dimensional, learnable signal. The head pose (the ``_transform.txt`` matrix,
head frame to world) is a small smooth rotation and translation around an entity offset.

Time is the position of the frame inside its expression (0, 1, 2, ...), not the frame number,
so the motion of an expression does not depend on where it sits in the capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.synth.mesh import HeadTopology, surface_bump

MODES = ("jaw_open", "cheeks_puff", "lips_pucker", "brow_raise", "smile")
"""Deformation modes, in the order of coefficient vectors."""

# Mode weights per expression keyword (first match wins), in MODES order.
_PROFILES: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("Neutral", (0.05, 0.05, 0.05, 0.05, 0.05)),
    ("Cheek", (0.1, 1.0, 0.1, 0.1, 0.0)),
    ("Lips", (0.1, 0.3, 1.0, 0.1, 0.0)),
    ("Oooo", (0.3, 0.1, 1.0, 0.1, 0.0)),
    ("Jaw", (1.0, 0.0, 0.1, 0.3, 0.2)),
    ("Smile", (0.3, 0.2, 0.0, 0.2, 1.0)),
    ("Frown", (0.1, 0.0, 0.2, -0.8, -0.4)),
    ("Eyebrow", (0.1, 0.0, 0.0, 1.0, 0.0)),
    ("SEN_", (0.7, 0.1, 0.5, 0.2, 0.3)),
    ("EXP_", (0.8, 0.6, 0.6, 0.6, 0.6)),
)
_DEFAULT_PROFILE = (0.3, 0.3, 0.3, 0.3, 0.3)


def profile_of(expression: str) -> np.ndarray:
    """Mode weights (5,) float64 implied by an expression name."""
    for keyword, weights in _PROFILES:
        if keyword in expression:
            return np.array(weights)
    return np.array(_DEFAULT_PROFILE)


def deformation_basis(topology: HeadTopology, rest: np.ndarray) -> np.ndarray:
    """Displacement of every vertex for a unit coefficient of each mode.

    Args:
        topology: the shared grid (its rest angles place the modes on the face).
        rest: (7306, 3) float64 rest positions in mm.

    Returns:
        (5, 7306, 3) float64 displacements in mm, modes in ``MODES`` order.
    """
    polar, azimuth = topology.polar, topology.azimuth
    degrees = np.degrees(polar)
    outward = np.stack([np.sin(azimuth), np.zeros_like(azimuth), np.cos(azimuth)], 1)
    basis = np.zeros((len(MODES), rest.shape[0], 3))

    below_mouth = np.clip((degrees - 112.0) / 16.0, 0.0, 1.0)
    below_mouth = below_mouth * below_mouth * (3.0 - 2.0 * below_mouth)
    above_neck = np.clip((170.0 - degrees) / 20.0, 0.0, 1.0)
    front = np.exp(-0.5 * (np.degrees(azimuth) / 38.0) ** 2)
    basis[0] = (below_mouth * above_neck * front)[:, None] * np.array([0.0, -13.0, -4.0])

    for side in (-1.0, 1.0):
        cheek = surface_bump(polar, azimuth, (105.0, 40.0 * side), (9.0, 13.0))
        basis[1] += 9.0 * cheek[:, None] * outward
        corner = surface_bump(polar, azimuth, (116.0, 19.0 * side), (5.0, 7.0))
        basis[4] += corner[:, None] * np.array([3.0 * side, 4.5, -2.0])

    lips = surface_bump(polar, azimuth, (117.0, 0.0), (5.0, 11.0))
    basis[2] = lips[:, None] * np.array([0.0, 0.0, 8.0])
    brow = surface_bump(polar, azimuth, (75.0, 0.0), (7.0, 30.0))
    basis[3] = brow[:, None] * np.array([0.0, 5.0, 0.0])
    return basis


@dataclass(frozen=True)
class ExpressionMotion:
    """Smooth time functions of one expression.

    Attributes:
        amplitude: (5,) float64 peak coefficient of each mode.
        period: (5,) float64 period of each mode, in frames of the expression.
        phase: (5,) float64 phase of each mode, radians.
        pose_amplitude: (6,) float64 yaw, pitch, roll (degrees) and x, y, z translation (mm).
        pose_period: (6,) float64 periods, in frames of the expression.
        pose_phase: (6,) float64 phases, radians.
        pose_offset: (3,) float64 head position of the entity in the world, mm.
    """

    amplitude: np.ndarray
    period: np.ndarray
    phase: np.ndarray
    pose_amplitude: np.ndarray
    pose_period: np.ndarray
    pose_phase: np.ndarray
    pose_offset: np.ndarray


def expression_motion(seed: int, expression_index: int, expression: str) -> ExpressionMotion:
    """Draw the motion of one expression, reproducibly from (seed, expression index)."""
    rng = np.random.default_rng([seed, 101, expression_index])
    speech = expression.startswith("SEN_")
    amplitude = profile_of(expression) * rng.uniform(0.8, 1.2, len(MODES)) + rng.uniform(0.0, 0.1, len(MODES))
    # Speech moves faster than posed expressions; both stay smooth at one sample per frame.
    period = rng.uniform(6.0, 12.0, len(MODES)) if speech else rng.uniform(10.0, 24.0, len(MODES))
    phase = rng.uniform(0.0, 2.0 * np.pi, len(MODES))
    pose_amplitude = np.array([5.0, 3.0, 2.0, 6.0, 4.0, 5.0]) * rng.uniform(0.5, 1.0, 6)
    pose_period = rng.uniform(14.0, 40.0, 6)
    pose_phase = rng.uniform(0.0, 2.0 * np.pi, 6)
    offset_rng = np.random.default_rng([seed, 102])
    pose_offset = offset_rng.uniform(-1.0, 1.0, 3) * np.array([5.0, 10.0, 8.0])
    return ExpressionMotion(amplitude, period, phase, pose_amplitude, pose_period, pose_phase, pose_offset)


def coefficients(motion: ExpressionMotion, time: float) -> np.ndarray:
    """Mode coefficients (5,) float64 at ``time`` (frame position inside the expression)."""
    return motion.amplitude * 0.5 * (1.0 - np.cos(2.0 * np.pi * time / motion.period + motion.phase))


def deform(rest: np.ndarray, basis: np.ndarray, coefficient: np.ndarray) -> np.ndarray:
    """Vertices (7306, 3) float64 of the rest head moved by ``coefficient`` (5,)."""
    return rest + np.tensordot(coefficient, basis, axes=1)


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) float64 rotation: roll about z, then pitch about x, then yaw about y (degrees)."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0.0, np.sin(y)], [0.0, 1.0, 0.0], [-np.sin(y), 0.0, np.cos(y)]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(p), -np.sin(p)], [0.0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0.0], [np.sin(r), np.cos(r), 0.0], [0.0, 0.0, 1.0]])
    return ry @ rx @ rz


def head_pose(motion: ExpressionMotion, time: float) -> np.ndarray:
    """Head pose [R_f | t_f] (3, 4) float64 at ``time``, as written to ``_transform.txt``.

    The rotation is rounded to 9 decimals and the translation to 4 so that the text file
    round-trips exactly to the matrix used for rendering.
    """
    wave = motion.pose_amplitude * np.sin(2.0 * np.pi * time / motion.pose_period + motion.pose_phase)
    pose = np.zeros((3, 4))
    pose[:, :3] = np.round(rotation(*wave[:3]), 9)
    pose[:, 3] = np.round(motion.pose_offset + wave[3:], 4)
    return pose
