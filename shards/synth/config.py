"""What to synthesise: the validated knobs of ``multiface synth`` and ``synthesize()``."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from shards.layout import PHOTO_COLS, PHOTO_ROWS, TEXTURE_SIZE
from shards.synth.capture import EXPRESSIONS, MAX_FRAMES

MAX_CAMERAS = 160
"""The largest real rig (Multiface v2) has about 160 cameras."""

MIN_PHOTO_SIDE = 16
MIN_TEXTURE_SIZE = 32
MAX_PHOTO_SIDE = 8192
MAX_TEXTURE_SIZE = 4096

_PHOTO_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_photo_size(text: str) -> tuple[int, int]:
    """Parse ``ROWSxCOLS`` (e.g. ``2048x1334``) into (rows, cols), or raise ``ValueError``."""
    match = _PHOTO_SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"photo size {text!r} is not of the form ROWSxCOLS; write e.g. '2048x1334' "
            "(the real size) or '128x84' (a small test size)"
        )
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic entity's size and seed; raises ``ValueError`` naming a bad value and the fix.

    Attributes:
        num_expressions: how many expressions, taken in order from ``capture.EXPRESSIONS``.
        num_frames: kept frames per expression.
        num_cameras: cameras in the rig (and KRT blocks).
        photo_rows, photo_cols: photo size; the real one is 2048 x 1334.
        tex_size: texture side; the real one is 1024 (folders keep the name
            ``unwrapped_uv_1024`` whatever the size, as the reference layout fixes it).
        seed: drives the entity name, rig, motion and colours.
    """

    num_expressions: int = 2
    num_frames: int = 5
    num_cameras: int = 4
    photo_rows: int = PHOTO_ROWS
    photo_cols: int = PHOTO_COLS
    tex_size: int = TEXTURE_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_expressions",
            "num_frames",
            "num_cameras",
            "photo_rows",
            "photo_cols",
            "tex_size",
            "seed",
        ):
            value = getattr(self, name)
            # numpy integers are as good as ints; store plain ints so the config pickles and prints cleanly.
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        _check_range("number of expressions", self.num_expressions, 1, len(EXPRESSIONS))
        _check_range("number of frames", self.num_frames, 1, MAX_FRAMES)
        _check_range("number of cameras", self.num_cameras, 1, MAX_CAMERAS)
        _check_range("photo rows", self.photo_rows, MIN_PHOTO_SIDE, MAX_PHOTO_SIDE)
        _check_range("photo columns", self.photo_cols, MIN_PHOTO_SIDE, MAX_PHOTO_SIDE)
        _check_range("texture size", self.tex_size, MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE)
        _check_range("seed", self.seed, 0, 2**63 - 1)


def _check_range(what: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer from {low} to {high}, got {value!r}")
