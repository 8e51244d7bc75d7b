"""Where each file of a downloaded Multiface entity lives.

The on-disk layout of one entity (reference section 1) is encoded here once, so that
the reader, the completeness scan, the ingest and the synthetic generator agree on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ENTITY_NAME_RE = re.compile(r"^m--(?P<date>\d{8})--(?P<time>\d{4})--(?P<entity_id>[0-9A-Za-z]+)--GHS$")
"""Root folder name of an entity, e.g. ``m--20180227--0000--6795937--GHS``."""

EXPRESSION_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # real names hold hyphens: SEN_a_voice_spoke_near-at-hand
FRAME_RE = re.compile(r"^\d{6}$")
CAMERA_RE = re.compile(r"^\d+$")

NUM_VERTICES = 7306
MESH_BIN_BYTES = NUM_VERTICES * 3 * 4
PHOTO_ROWS, PHOTO_COLS = 2048, 1334
TEXTURE_SIZE = 1024

METADATA_FILES = ("KRT", "frame_list.txt", "tex_mean.png", "tex_var.txt", "vert_mean.bin", "vert_var.txt")
"""Per-entity files at the entity root that training needs."""

PHOTO_DIR = "images"
TEXTURE_DIR = "unwrapped_uv_1024"
MESH_DIR = "tracked_mesh"
AUDIO_DIR = "audio"
AVERAGE_DIR = "average"


def entity_id_of(root_name: str) -> str:
    """Return the entity id of a root folder name, or raise ``ValueError`` naming the fix."""
    match = ENTITY_NAME_RE.match(root_name)
    if match is None:
        raise ValueError(
            f"{root_name!r} is not a Multiface entity folder name; expected "
            "'m--YYYYMMDD--HHMM--<ENTITY_ID>--GHS', e.g. 'm--20180227--0000--6795937--GHS'"
        )
    return match["entity_id"]


def is_sentence(expression: str) -> bool:
    """Whether an expression is one of the read sentences, which carry audio."""
    return expression.startswith("SEN_")


@dataclass(frozen=True)
class EntityLayout:
    """Paths of one entity's files, rooted at the entity folder."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    def metadata(self, name: str) -> Path:
        return self.root / name

    @property
    def krt(self) -> Path:
        return self.root / "KRT"

    @property
    def frame_list(self) -> Path:
        return self.root / "frame_list.txt"

    @property
    def tex_mean(self) -> Path:
        return self.root / "tex_mean.png"

    @property
    def tex_var(self) -> Path:
        return self.root / "tex_var.txt"

    @property
    def vert_mean(self) -> Path:
        return self.root / "vert_mean.bin"

    @property
    def vert_var(self) -> Path:
        return self.root / "vert_var.txt"

    def photo_dir(self, expression: str, camera: str) -> Path:
        return self.root / PHOTO_DIR / expression / camera

    def photo(self, expression: str, camera: str, frame: str) -> Path:
        return self.photo_dir(expression, camera) / f"{frame}.png"

    def texture_dir(self, expression: str, camera: str) -> Path:
        return self.root / TEXTURE_DIR / expression / camera

    def texture(self, expression: str, camera: str, frame: str) -> Path:
        return self.texture_dir(expression, camera) / f"{frame}.png"

    def average_texture(self, expression: str, frame: str) -> Path:
        return self.texture_dir(expression, AVERAGE_DIR) / f"{frame}.png"

    def mesh_dir(self, expression: str) -> Path:
        return self.root / MESH_DIR / expression

    def mesh_bin(self, expression: str, frame: str) -> Path:
        return self.mesh_dir(expression) / f"{frame}.bin"

    def mesh_obj(self, expression: str, frame: str) -> Path:
        return self.mesh_dir(expression) / f"{frame}.obj"

    def transform(self, expression: str, frame: str) -> Path:
        return self.mesh_dir(expression) / f"{frame}_transform.txt"

    def audio(self, expression: str) -> Path:
        return self.root / AUDIO_DIR / f"{expression}.wav"
