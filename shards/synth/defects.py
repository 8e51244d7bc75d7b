"""Defects to inject into a synthetic entity, so tests can pin how readers cope with real damage.

Real downloads have frames dropped for some cameras, missing folders, truncated or corrupted
files. Each function here damages a written entity in one such way and returns the sorted
paths it removed or changed, so a test knows the expected holes exactly. Functions never
touch ``frame_list.txt``: a dropped frame is still listed, as in the real release, and the
reader must notice that its files are gone.

Example::

    root = synthesize(tmp_path, expressions=2, frames=3, cameras=3, photo_size=(128, 84), tex_size=64)
    holes = defects.drop_frame(root, "E057_Cheeks_Puffed", "012429", camera="400003")
"""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shards.layout import MESH_DIR, PHOTO_DIR, TEXTURE_DIR, EntityLayout

KRT_BLOCK_LINES = 9
"""Lines per camera block in KRT: name, 3 K rows, distortion, 3 [R|t] rows, blank line."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CORRUPTION = bytes(range(256)) * 2


def _layout(entity: str | Path | EntityLayout) -> EntityLayout:
    return entity if isinstance(entity, EntityLayout) else EntityLayout(Path(entity))


def _remove(paths: Iterable[Path]) -> list[Path]:
    removed = []
    for path in paths:
        if path.is_file():
            path.unlink()
            removed.append(path)
    return sorted(removed)


def _frames_of(layout: EntityLayout, expression: str, frames: Iterable[str] | None) -> list[str]:
    if frames is not None:
        return list(frames)
    pairs = (line.split() for line in layout.frame_list.read_text(encoding="ascii").splitlines())
    return [pair[1] for pair in pairs if len(pair) == 2 and pair[0] == expression]


def _cameras_of(layout: EntityLayout) -> list[str]:
    lines = layout.krt.read_text(encoding="ascii").splitlines()
    return [lines[i].strip() for i in range(0, len(lines), KRT_BLOCK_LINES) if lines[i].strip()]


def drop_frame(
    entity: str | Path | EntityLayout, expression: str, frame: str, camera: str | None = None
) -> list[Path]:
    """Delete one frame's files, for one camera or from everything.

    Args:
        entity: the entity root folder.
        expression, frame: the frame, as listed in ``frame_list.txt``.
        camera: when given, only this camera's photo and per-view texture go (the frame stays
            usable from the other cameras); when None, every photo, per-view texture, the
            average texture and the mesh files (.bin, .obj, _transform.txt) of the frame go.

    Returns:
        The deleted files, sorted.
    """
    layout = _layout(entity)
    cameras = [camera] if camera is not None else _cameras_of(layout)
    paths = [layout.photo(expression, name, frame) for name in cameras]
    paths += [layout.texture(expression, name, frame) for name in cameras]
    if camera is None:
        paths += [layout.average_texture(expression, frame), layout.mesh_bin(expression, frame)]
        paths += [layout.mesh_obj(expression, frame), layout.transform(expression, frame)]
    return _remove(paths)


def drop_camera(
    entity: str | Path | EntityLayout, camera: str, expressions: Iterable[str] | None = None
) -> list[Path]:
    """Delete a camera's photo and per-view texture folders (its KRT block stays).

    Args:
        entity: the entity root folder.
        camera: camera name, e.g. ``"400004"``.
        expressions: limit to these expressions; all by default.

    Returns:
        Every deleted file, sorted (the emptied folders are deleted too).
    """
    layout = _layout(entity)
    if expressions is None:
        expressions = sorted(
            {line.split()[0] for line in layout.frame_list.read_text(encoding="ascii").split("\n") if line}
        )
    removed: list[Path] = []
    for expression in expressions:
        for folder in (layout.photo_dir(expression, camera), layout.texture_dir(expression, camera)):
            if folder.is_dir():
                removed += [path for path in folder.rglob("*") if path.is_file()]
                shutil.rmtree(folder)
    return sorted(removed)


def drop_textures(
    entity: str | Path | EntityLayout, expression: str, camera: str, frames: Iterable[str] | None = None
) -> list[Path]:
    """Delete per-view textures of one camera (all frames of the expression by default)."""
    layout = _layout(entity)
    return _remove(
        layout.texture(expression, camera, frame) for frame in _frames_of(layout, expression, frames)
    )


def drop_average_textures(
    entity: str | Path | EntityLayout, expression: str, frames: Iterable[str] | None = None
) -> list[Path]:
    """Delete average textures (all frames of the expression by default)."""
    layout = _layout(entity)
    return _remove(
        layout.average_texture(expression, frame) for frame in _frames_of(layout, expression, frames)
    )


def drop_meshes(
    entity: str | Path | EntityLayout,
    expression: str,
    frames: Iterable[str] | None = None,
    kinds: Iterable[str] = ("bin", "obj", "transform"),
) -> list[Path]:
    """Delete tracked-mesh files: any of ``"bin"``, ``"obj"``, ``"transform"`` per frame."""
    layout = _layout(entity)
    makers = {"bin": layout.mesh_bin, "obj": layout.mesh_obj, "transform": layout.transform}
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(makers))
    if unknown:
        raise ValueError(f"unknown mesh file kinds {unknown}; use any of {sorted(makers)}")
    frames = _frames_of(layout, expression, frames)
    return _remove(makers[kind](expression, frame) for frame in frames for kind in kinds)


def _pick(root: Path, pattern_dirs: tuple[str, ...], suffix: str, seed: int | None) -> Path:
    """A file chosen reproducibly by ``seed`` among an entity's files of one kind."""
    candidates = sorted(
        path for folder in pattern_dirs for path in (root / folder).rglob(f"*{suffix}") if path.is_file()
    )
    if not candidates:
        raise ValueError(f"{root}: no {suffix} files under {', '.join(pattern_dirs)} to damage")
    return candidates[
        int(np.random.default_rng([0 if seed is None else seed, 501]).integers(len(candidates)))
    ]


def corrupt_png(target: str | Path, seed: int | None = None) -> list[Path]:
    """Overwrite bytes in the middle of a PNG's first IDAT chunk, keeping its size.

    The chunk's CRC no longer matches and the zlib stream is broken, so decoders (libpng,
    Pillow) refuse the file while its size and signature still look right.

    Args:
        target: a PNG file, or an entity root folder: then one of its photos or textures
            (per-view or average) is chosen reproducibly from ``seed``.
        seed: picks the file when ``target`` is a folder.

    Returns:
        ``[the corrupted file]``.
    """
    path = Path(target)
    if path.is_dir():
        path = _pick(path, (PHOTO_DIR, TEXTURE_DIR), ".png", seed)
    data = bytearray(path.read_bytes())
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError(f"{path}: not a PNG (bad signature), cannot corrupt it in place")
    offset = 8
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        if data[offset + 4 : offset + 8] == b"IDAT":
            start = offset + 8
            size = min(len(_CORRUPTION), max(1, length // 2))
            middle = start + (length - size) // 2
            data[middle : middle + size] = _CORRUPTION[:size]
            stored_crc = struct.unpack(">I", data[start + length : start + length + 4])[0]
            if zlib.crc32(data[offset + 4 : start + length]) == stored_crc:
                # The pattern happened to equal the original bytes; flip them instead.
                data[middle : middle + size] = bytes(b ^ 0xFF for b in data[middle : middle + size])
            path.write_bytes(bytes(data))
            return [path]
        offset += 12 + length
    raise ValueError(f"{path}: no IDAT chunk found, cannot corrupt it")


def truncate_bin(target: str | Path, seed: int | None = None, keep_bytes: int | None = None) -> list[Path]:
    """Cut a mesh ``.bin`` to ``keep_bytes`` (half its size by default).

    Args:
        target: a ``.bin`` file, or an entity root folder: then one of its mesh ``.bin`` files
            is chosen reproducibly from ``seed``.
        seed: picks the file when ``target`` is a folder.
        keep_bytes: bytes to keep.

    Returns:
        ``[the truncated file]``.
    """
    path = Path(target)
    if path.is_dir():
        path = _pick(path, (MESH_DIR,), ".bin", seed)
    data = path.read_bytes()
    keep = len(data) // 2 if keep_bytes is None else keep_bytes
    if not 0 <= keep < len(data):
        raise ValueError(f"{path}: keep_bytes must be from 0 to {len(data) - 1}, got {keep}")
    path.write_bytes(data[:keep])
    return [path]


def break_krt(entity: str | Path | EntityLayout, camera: str) -> list[Path]:
    """Make the first intrinsic line of ``camera``'s KRT block malformed.

    Its middle number becomes ``0.0.0``, which no float parser accepts. The broken line is
    line ``9 * block_index + 2`` of the file (1-based), where block_index is the camera's
    position in KRT order.

    Returns:
        ``[KRT path]``.
    """
    layout = _layout(entity)
    lines = layout.krt.read_text(encoding="ascii").split("\n")
    for start in range(0, len(lines), KRT_BLOCK_LINES):
        if lines[start].strip() == camera:
            numbers = lines[start + 1].split()
            numbers[1] = "0.0.0"
            lines[start + 1] = " ".join(numbers)
            layout.krt.write_text("\n".join(lines), encoding="ascii")
            return [layout.krt]
    raise ValueError(f"{layout.krt}: no block for camera {camera!r}; cameras are {_cameras_of(layout)}")
