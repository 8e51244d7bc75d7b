"""Which training samples an entity holds, found from directory listings.

A sample is one (expression, frame, camera). The reference rule (reference section 3): the
frame is listed in ``frame_list.txt``, its average texture exists, and the camera's per-view
texture exists. Files are found by listing each folder once (``os.scandir``), never by a stat
per expected file, so a tree of hundreds of thousands of files is indexed in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shards.layout import AVERAGE_DIR, MESH_DIR, PHOTO_DIR, TEXTURE_DIR, EntityLayout

DEFAULT_TEST_PREFIXES = ("EXP_ROM", "EXP_free_face")
"""The reference's default test expressions (train.py's ``--test_segment`` default)."""


@dataclass(frozen=True, order=True)
class SampleKey:
    """One training sample: an expression, a 6-digit frame and a camera name."""

    expression: str
    frame: str
    camera: str

    @property
    def key(self) -> str:
        """The WebDataset ``__key__`` of the sample: ``<expression>/<frame>/<camera>``."""
        return f"{self.expression}/{self.frame}/{self.camera}"

    @classmethod
    def from_key(cls, key: str) -> SampleKey:
        parts = key.split("/")
        if len(parts) != 3:
            raise ValueError(f"sample key {key!r} is not '<expression>/<frame>/<camera>'")
        return cls(*parts)


def _list_dir(path: Path) -> dict[str, list[str]]:
    """Names in a folder split into sub-folders and files; empty when the folder is missing."""
    folders: list[str] = []
    files: list[str] = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                (folders if entry.is_dir(follow_symlinks=False) else files).append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return {"folders": folders, "files": files}


def _stems(names: Iterable[str], suffix: str) -> set[str]:
    return {name[: -len(suffix)] for name in names if name.endswith(suffix)}


@dataclass
class EntityIndex:
    """What files an entity holds, from one listing of each folder.

    Attributes:
        photos: (expression, camera) -> frames with a photo.
        textures: (expression, camera) -> frames with a per-view texture.
        averages: expression -> frames with an average texture.
        mesh_bins, mesh_objs, transforms: expression -> frames with that mesh file.
        audio: names of files in ``audio/``.
        num_files: files seen in the whole listing.
    """

    photos: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    textures: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    averages: dict[str, set[str]] = field(default_factory=dict)
    mesh_bins: dict[str, set[str]] = field(default_factory=dict)
    mesh_objs: dict[str, set[str]] = field(default_factory=dict)
    transforms: dict[str, set[str]] = field(default_factory=dict)
    audio: set[str] = field(default_factory=set)
    num_files: int = 0

    @property
    def expressions(self) -> set[str]:
        """Expressions with any folder on disk."""
        names = set(self.averages) | set(self.mesh_bins) | set(self.mesh_objs)
        names |= {expression for expression, _ in self.photos} | {
            expression for expression, _ in self.textures
        }
        return names

    @property
    def cameras(self) -> set[str]:
        return {camera for _, camera in self.photos} | {camera for _, camera in self.textures}


def index_entity(layout: EntityLayout) -> EntityIndex:
    """List an entity's image, texture, mesh and audio folders once each."""
    index = EntityIndex()
    for expression in _list_dir(layout.root / PHOTO_DIR)["folders"]:
        for camera in _list_dir(layout.root / PHOTO_DIR / expression)["folders"]:
            files = _list_dir(layout.photo_dir(expression, camera))["files"]
            index.num_files += len(files)
            index.photos[(expression, camera)] = _stems(files, ".png")
    for expression in _list_dir(layout.root / TEXTURE_DIR)["folders"]:
        for camera in _list_dir(layout.root / TEXTURE_DIR / expression)["folders"]:
            files = _list_dir(layout.texture_dir(expression, camera))["files"]
            index.num_files += len(files)
            frames = _stems(files, ".png")
            if camera == AVERAGE_DIR:
                index.averages[expression] = frames
            else:
                index.textures[(expression, camera)] = frames
    for expression in _list_dir(layout.root / MESH_DIR)["folders"]:
        files = _list_dir(layout.mesh_dir(expression))["files"]
        index.num_files += len(files)
        index.transforms[expression] = _stems(files, "_transform.txt")
        index.mesh_bins[expression] = _stems(files, ".bin")
        index.mesh_objs[expression] = _stems(files, ".obj")
    index.audio = set(_list_dir(layout.root / "audio")["files"])
    index.num_files += len(index.audio)
    return index


def select_expressions(
    expression: str, valid_prefix: Sequence[str] | None = None, exclude_prefix: Sequence[str] | None = None
) -> bool:
    """The reference's expression filter: keep if it starts with a valid prefix, and no excluded one."""
    if valid_prefix is not None and not any(expression.startswith(prefix) for prefix in valid_prefix):
        return False
    if exclude_prefix is not None and any(expression.startswith(prefix) for prefix in exclude_prefix):
        return False
    return True


def enumerate_samples(
    frame_list: Sequence[tuple[str, str]],
    cameras: Sequence[str],
    index: EntityIndex,
    valid_prefix: Sequence[str] | None = None,
    exclude_prefix: Sequence[str] | None = None,
) -> list[SampleKey]:
    """Samples by the reference rule, in the reference order (frame list order, then cameras).

    Args:
        frame_list: (expression, frame) pairs from ``frame_list.txt``.
        cameras: camera names to consider, in order (KRT order, or a camera split's list).
        index: the entity's listing.
        valid_prefix: keep only expressions starting with one of these (the test split).
        exclude_prefix: drop expressions starting with one of these (the train split).
    """
    samples = []
    for expression, frame in frame_list:
        if not select_expressions(expression, valid_prefix, exclude_prefix):
            continue
        if frame not in index.averages.get(expression, ()):
            continue
        for camera in cameras:
            if frame in index.textures.get((expression, camera), ()):
                samples.append(SampleKey(expression, frame, camera))
    return samples
