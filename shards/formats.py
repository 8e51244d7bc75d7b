"""Parsers for the files of a Multiface entity (reference sections 1-2).

Every parser takes the file's content plus a ``source`` name and raises
:class:`shards.errors.FormatError` naming the source, the line and what was expected, so the
same code serves files on disk and members of a shard. ``read_*`` helpers open a path.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shards.errors import FormatError
from shards.layout import FRAME_RE, NUM_VERTICES


@dataclass(frozen=True)
class Camera:
    """One KRT block.

    Attributes:
        name: camera folder name, e.g. ``"400002"``.
        index: position in the KRT file (the seed's ``cam`` index; 0 is the colour anchor).
        intrin: (3, 3) float64 intrinsic matrix K.
        dist: (D,) float64 distortion coefficients (unused by the reference).
        extrin: (3, 4) float64 world-to-camera [R_C | t_C].
        text: the block's original lines, so a sample can carry its camera verbatim.
    """

    name: str
    index: int
    intrin: np.ndarray
    dist: np.ndarray
    extrin: np.ndarray
    text: str

    @property
    def position(self) -> np.ndarray:
        """Camera centre in world coordinates, ``-R_C^T t_C``, (3,) float64."""
        rotation, translation = self.extrin[:, :3], self.extrin[:, 3]
        return -rotation.T @ translation


@dataclass(frozen=True)
class Topology:
    """Mesh topology of an OBJ file.

    Attributes:
        verts: (V, 3) float32 vertex positions.
        uvs: (Nuv, 2) float32 texture coordinates.
        vert_ids: (F, 3) int32 0-based vertex index of each triangle corner.
        uv_ids: (F, 3) int32 0-based uv index of each triangle corner.
    """

    verts: np.ndarray
    uvs: np.ndarray
    vert_ids: np.ndarray
    uv_ids: np.ndarray


def _floats(line: str, source: str, number: int, count: int | None, what: str) -> list[float]:
    parts = line.split()
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise FormatError(source, f"{what}: whitespace-separated numbers", number, line) from None
    if count is not None and len(values) != count:
        raise FormatError(source, f"{what}: {count} numbers, got {len(values)}", number, line)
    return values


def parse_krt(text: str, source: str = "KRT", broken: dict[str, str] | None = None) -> dict[str, Camera]:
    """Parse a KRT calibration file into cameras keyed by name, in file order.

    Args:
        text: the file's content.
        source: the name used in error messages.
        broken: if given, a block with malformed numbers is recorded here (camera name ->
            error message) and left out instead of failing the whole file; the cameras after it
            keep their KRT index. Without it, the first malformed block raises.
    """
    lines = text.splitlines()
    cameras: dict[str, Camera] = {}
    index = 0
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        start = i
        name = lines[i].strip()
        if len(name.split()) != 1:
            raise FormatError(source, "a camera name line (one word)", i + 1, lines[i])
        if name in cameras or (broken is not None and name in broken):
            raise FormatError(source, f"each camera once; {name!r} appears again", i + 1, lines[i])
        if i + 8 > len(lines):
            raise FormatError(source, f"7 lines (K, distortion, [R|t]) after camera {name!r}", i + 1)
        try:
            intrin = [_floats(lines[i + 1 + r], source, i + 2 + r, 3, "intrinsic row") for r in range(3)]
            dist = _floats(lines[i + 4], source, i + 5, None, "distortion coefficients")
            extrin = [_floats(lines[i + 5 + r], source, i + 6 + r, 4, "extrinsic row") for r in range(3)]
        except FormatError as error:
            if broken is None:
                raise
            broken[name] = str(error)
        else:
            cameras[name] = Camera(
                name=name,
                index=index,
                intrin=np.array(intrin, dtype=np.float64),
                dist=np.array(dist, dtype=np.float64),
                extrin=np.array(extrin, dtype=np.float64),
                text="\n".join(lines[start : start + 8]) + "\n\n",
            )
        if i + 8 < len(lines) and lines[i + 8].strip():
            raise FormatError(source, f"a blank line after camera {name!r}", i + 9, lines[i + 8])
        index += 1
        i += 9
    if not cameras and not broken:
        raise FormatError(source, "at least one camera block")
    return cameras


def parse_frame_list(text: str, source: str = "frame_list.txt") -> list[tuple[str, str]]:
    """Parse ``"<EXPRESSION> <FRAME>"`` lines; FRAME is 6 digits. Blank lines are skipped."""
    frames = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not FRAME_RE.match(parts[1]):
            raise FormatError(source, "'<EXPRESSION> <FRAME>' with a 6-digit frame", number, line)
        frames.append((parts[0], parts[1]))
    return frames


def parse_obj(text: str, source: str = "mesh.obj") -> Topology:
    """Parse an OBJ with ``v``, ``vt`` and triangular ``f a/b c/d e/f`` lines (1-based).

    Well-formed files are parsed in bulk by numpy; a file numpy cannot parse is read again
    line by line, so that the error names the line and what was expected there.
    """
    try:
        topology = _parse_obj_bulk(text)
    except ValueError:
        topology = _parse_obj_lines(text, source)
    if len(topology.verts) == 0 or len(topology.vert_ids) == 0:
        raise FormatError(source, "'v' and 'f' lines")
    if topology.vert_ids.min() < 0 or topology.vert_ids.max() >= len(topology.verts):
        raise FormatError(source, f"face vertex indices in 1..{len(topology.verts)}")
    if len(topology.uvs) == 0 or topology.uv_ids.min() < 0 or topology.uv_ids.max() >= len(topology.uvs):
        raise FormatError(source, f"face uv indices in 1..{len(topology.uvs)}")
    return topology


def _parse_obj_bulk(text: str) -> Topology:
    """Fast path: every line of a kind has the same shape; raise ValueError otherwise."""
    kinds: dict[str, list[str]] = {"v": [], "vt": [], "f": []}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind in kinds:
            kinds[kind].append(rest)
        elif kind and not kind.startswith("#") and kind not in ("vn", "o", "g", "s", "usemtl", "mtllib"):
            raise ValueError(kind)

    def table(lines: list[str], columns: int, dtype) -> np.ndarray:
        values = np.array(" ".join(lines).split(), dtype=dtype)
        if values.size != columns * len(lines):
            raise ValueError("ragged")
        return values.reshape(len(lines), columns)

    uv_columns = len(kinds["vt"][0].split()) if kinds["vt"] else 2
    corner = kinds["f"][0].split()[0].split("/") if kinds["f"] else ["", ""]
    if len(corner) < 2 or not corner[1]:
        raise ValueError("face corners without uv")
    faces = table([line.replace("/", " ") for line in kinds["f"]], 3 * len(corner), np.int64)
    faces = faces.reshape(len(kinds["f"]), 3, len(corner))
    return Topology(
        verts=table(kinds["v"], 3, np.float32),
        uvs=np.ascontiguousarray(table(kinds["vt"], uv_columns, np.float32)[:, :2]),
        vert_ids=(faces[:, :, 0] - 1).astype(np.int32),
        uv_ids=(faces[:, :, 1] - 1).astype(np.int32),
    )


def _parse_obj_lines(text: str, source: str) -> Topology:
    verts: list[list[float]] = []
    uvs: list[list[float]] = []
    vert_ids: list[list[int]] = []
    uv_ids: list[list[int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        kind = parts[0]
        if kind == "v":
            verts.append(_floats(" ".join(parts[1:]), source, number, 3, "vertex x y z"))
        elif kind == "vt":
            values = _floats(" ".join(parts[1:]), source, number, None, "texture coordinate u v")
            if len(values) < 2:
                raise FormatError(source, "texture coordinate 'vt u v'", number, line)
            uvs.append(values[:2])
        elif kind == "f":
            if len(parts) != 4:
                raise FormatError(source, "a triangle 'f a/b c/d e/f'", number, line)
            try:
                corners = [tuple(int(x) for x in corner.split("/")[:2]) for corner in parts[1:]]
            except ValueError:
                raise FormatError(source, "face corners 'vertex/uv' as integers", number, line) from None
            if any(len(corner) != 2 for corner in corners):
                raise FormatError(source, "face corners with a uv index, 'vertex/uv'", number, line)
            vert_ids.append([corner[0] for corner in corners])
            uv_ids.append([corner[1] for corner in corners])
    return Topology(
        verts=np.array(verts, dtype=np.float32).reshape(-1, 3),
        uvs=np.array(uvs, dtype=np.float32).reshape(-1, 2),
        vert_ids=np.array(vert_ids, dtype=np.int32).reshape(-1, 3) - 1,
        uv_ids=np.array(uv_ids, dtype=np.int32).reshape(-1, 3) - 1,
    )


def parse_vertices(data: bytes, source: str = "mesh.bin", num_vertices: int = NUM_VERTICES) -> np.ndarray:
    """Parse a vertex ``.bin`` (float32 x, y, z per vertex) into a (V, 3) float32 array."""
    expected = num_vertices * 12
    if len(data) != expected:
        raise FormatError(
            source,
            f"{expected} bytes (float32 x,y,z for {num_vertices} vertices)",
            found=f"{len(data)} bytes",
        )
    return np.frombuffer(data, dtype=np.float32).reshape(num_vertices, 3).copy()


def parse_transform(text: str, source: str = "transform.txt") -> np.ndarray:
    """Parse a head pose ``[R_f | t_f]``: at least 3 rows of 4 numbers, as float64 (R, 4)."""
    rows = [
        _floats(line, source, number, 4, "head pose row 'r0 r1 r2 t'")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if len(rows) < 3:
        raise FormatError(source, "at least 3 rows of the head pose [R | t]", found=f"{len(rows)} rows")
    return np.array(rows, dtype=np.float64)


def parse_scalar(text: str, source: str) -> float:
    """Parse a file holding one number (``tex_var.txt``, ``vert_var.txt``)."""
    values = _floats(text, source, 1, None, "one number")
    if len(values) != 1:
        raise FormatError(source, "exactly one number", found=text.strip())
    if not np.isfinite(values[0]) or values[0] <= 0:
        raise FormatError(source, "a positive finite variance", found=text.strip())
    return values[0]


def parse_vert_mean(
    data: bytes, source: str = "vert_mean.bin", num_vertices: int = NUM_VERTICES
) -> np.ndarray:
    """Parse ``vert_mean.bin`` into a flat (V*3,) float32 array, as the reference keeps it."""
    return parse_vertices(data, source, num_vertices).reshape(-1)


def parse_png(data: bytes, source: str) -> np.ndarray:
    """Decode an RGB PNG into an (H, W, 3) uint8 array, or raise naming the file."""
    check_png(data, source)
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image)
    except (OSError, ValueError) as error:
        raise FormatError(source, f"a decodable PNG ({error})") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise FormatError(source, "an 8-bit RGB PNG", found=f"array {array.shape} {array.dtype}")
    return array


def parse_camera_split(text: str, source: str = "camera config") -> dict[str, list[str]]:
    """Parse ``{"full": {"train": [...], "test": [...], "visual": [...]}}`` into name lists."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise FormatError(source, f"JSON ({error.msg})", error.lineno) from None
    full = config.get("full") if isinstance(config, dict) else None
    if not isinstance(full, dict):
        raise FormatError(source, 'an object {"full": {"train": [...], "test": [...], "visual": [...]}}')
    split = {}
    for part in ("train", "test", "visual"):
        names = full.get(part, [])
        if not isinstance(names, list):
            raise FormatError(source, f'"full"."{part}" as a list of camera names')
        split[part] = [str(name) for name in names]
    if not split["train"] and not split["test"]:
        raise FormatError(source, 'a non-empty "full"."train" or "full"."test" camera list')
    return split


def parse_test_segment(text: str, source: str = "test segment") -> list[str]:
    """Parse ``{"segment": [...]}``: the expression prefixes that form the test set."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise FormatError(source, f"JSON ({error.msg})", error.lineno) from None
    segment = config.get("segment") if isinstance(config, dict) else None
    if not isinstance(segment, list) or not all(isinstance(item, str) for item in segment):
        raise FormatError(source, 'an object {"segment": ["<expression prefix>", ...]}')
    return segment


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes, source: str) -> tuple[int, int]:
    """Check a PNG's structure without decoding it: signature, every chunk's CRC, IHDR, IEND.

    This catches truncation and bit flips at a few GB/s, so ingest can validate every image
    without paying for a full decode. Returns (width, height).
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise FormatError(source, "a PNG file (signature missing)")
    offset = len(_PNG_SIGNATURE)
    size = None
    while True:
        if offset + 12 > len(data):
            raise FormatError(source, "a complete PNG (file ends before IEND; truncated?)")
        (length,) = struct.unpack_from(">I", data, offset)
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(data):
            raise FormatError(source, f"a complete PNG (chunk {kind!r} runs past the end; truncated?)")
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise FormatError(
                source, f"an intact PNG (CRC mismatch in chunk {kind!r} at byte {offset}; corrupt)"
            )
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack_from(">IIBB", body)
            if depth != 8 or colour != 2:
                raise FormatError(
                    source, "an 8-bit RGB PNG", found=f"bit depth {depth}, colour type {colour}"
                )
            size = (width, height)
        if kind == b"IEND":
            break
        offset = end
    if size is None:
        raise FormatError(source, "a PNG with an IHDR chunk")
    return size


def read_text(path: Path) -> str:
    """Read a text file, naming the file if it is missing or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(str(path), "an existing file") from None
    except UnicodeDecodeError:
        raise FormatError(str(path), "UTF-8 text") from None


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FormatError(str(path), "an existing file") from None


def read_krt(path: Path) -> dict[str, Camera]:
    return parse_krt(read_text(path), str(path))


def read_frame_list(path: Path) -> list[tuple[str, str]]:
    return parse_frame_list(read_text(path), str(path))


def read_obj(path: Path) -> Topology:
    return parse_obj(read_text(path), str(path))


def read_vertices(path: Path) -> np.ndarray:
    return parse_vertices(read_bytes(path), str(path))


def read_transform(path: Path) -> np.ndarray:
    return parse_transform(read_text(path), str(path))


def read_scalar(path: Path) -> float:
    return parse_scalar(read_text(path), str(path))


def read_camera_split(path: Path) -> dict[str, list[str]]:
    return parse_camera_split(read_text(path), str(path))


def read_test_segment(path: Path) -> list[str]:
    return parse_test_segment(read_text(path), str(path))
