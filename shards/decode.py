"""Decode a shard sample into the reference training fields (numpy only, no torch).

``decode_sample`` returns exactly what the reference Dataset's ``__getitem__`` returns for the
same (expression, frame, camera): the same names, dtypes, shapes and values (reference
section 3), so code written against the reference Dataset can use it unchanged, e.g. as a
``webdataset`` ``.map``. ``EntityMetadata`` holds the per-entity files it needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shards import rice
from shards.codecs import EXTENSIONS, decode_image
from shards.errors import FormatError
from shards.formats import (
    Camera,
    Topology,
    parse_frame_list,
    parse_krt,
    parse_obj,
    parse_png,
    parse_scalar,
    parse_transform,
    parse_vert_mean,
    parse_vertices,
)
from shards.ingest import TOPOLOGY_NAME
from shards.manifest import META_DIR

ALL_FIELDS = (
    "photo",
    "tex",
    "avg_tex",
    "mask",
    "aligned_verts",
    "M",
    "view",
    "transf",
    "cam",
    "cam_idx",
    "exp",
    "frame",
    "uvs",
    "vert_ids",
    "uv_ids",
)
"""Every field the reference Dataset returns."""

# Images are read in any stored form (shards/codecs.py): a shard holds one of them.
_IMAGE_FORMS = tuple(f".{extension}" for extension in EXTENSIONS.values())
_MEMBERS_OF = {
    "photo": tuple(f"photo{form}" for form in _IMAGE_FORMS),
    "tex": tuple(f"tex{form}" for form in _IMAGE_FORMS),
    "mask": tuple(f"tex{form}" for form in _IMAGE_FORMS),
    "avg_tex": tuple(f"avg_tex{form}" for form in _IMAGE_FORMS),
    "aligned_verts": ("verts.bin",),
    "M": ("transform.txt",),
    "view": ("transform.txt",),
    "transf": ("transform.txt",),
}


def members_needed(fields: Iterable[str]) -> set[str]:
    """Sample members a set of fields reads (so a loader can skip decoding the others)."""
    needed = {"sample.json"}
    for name in fields:
        if name not in ALL_FIELDS:
            raise ValueError(f"unknown field {name!r}; expected some of {', '.join(ALL_FIELDS)}")
        needed.update(_MEMBERS_OF.get(name, ()))
    return needed


@dataclass
class EntityMetadata:
    """Per-entity data that decoding needs, parsed from the ``meta/`` files of a shard folder.

    Attributes:
        cameras: KRT cameras by name, in KRT order (``Camera.index`` is the ``cam`` field).
        frame_list: (expression, frame) pairs.
        topology: mesh topology of the first OBJ.
        texmean: (T, T, 3) float32 mean texture, flipped vertically (as the reference keeps it).
        texstd: sqrt(tex_var).
        vertmean: (V*3,) float32 mean vertices.
        vertstd: sqrt(vert_var).
    """

    cameras: dict[str, Camera]
    frame_list: list[tuple[str, str]]
    topology: Topology
    texmean: np.ndarray
    texstd: float
    vertmean: np.ndarray
    vertstd: float

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> EntityMetadata:
        """Build from metadata file contents keyed by name (``KRT``, ``tex_mean.png``, ...)."""

        def text(name: str) -> str:
            return files[name].decode()

        missing = {"KRT", "frame_list.txt", "tex_mean.png", "tex_var.txt", "vert_mean.bin", "vert_var.txt"}
        missing = (missing | {TOPOLOGY_NAME}) - set(files)
        if missing:
            raise FormatError("entity metadata", f"the files {', '.join(sorted(missing))}")
        texmean = parse_png(files["tex_mean.png"], "tex_mean.png").astype(np.float32)
        return cls(
            cameras=parse_krt(text("KRT"), "KRT", broken={}),
            frame_list=parse_frame_list(text("frame_list.txt")),
            topology=parse_obj(text(TOPOLOGY_NAME), TOPOLOGY_NAME),
            texmean=np.copy(np.flip(texmean, 0)),
            texstd=float(parse_scalar(text("tex_var.txt"), "tex_var.txt") ** 0.5),
            vertmean=parse_vert_mean(files["vert_mean.bin"]),
            vertstd=float(parse_scalar(text("vert_var.txt"), "vert_var.txt") ** 0.5),
        )

    @classmethod
    def from_shard_folder(cls, folder: Path) -> EntityMetadata:
        """Read ``meta/`` of an entity's shard folder (written by ingest)."""
        meta = Path(folder) / META_DIR
        return cls.from_files({path.name: path.read_bytes() for path in meta.iterdir() if path.is_file()})


def stored_image(
    sample: Mapping[str, object], name: str, keep_row_filter: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """The stored pixels of image ``name`` (``photo``, ``tex``, ``avg_tex``) in either form.

    Args:
        sample: the sample's members.
        name: the image.
        keep_row_filter: leave a ``delta-zstd`` image row-filtered (see
            :func:`shards.codecs.decompress_dzst`) and a ``delta-rice`` one packed
            (:func:`shards.codecs.packed_rice`); PNG images are pixels either way.
        out: an (H, W, 3) uint8 array to write the image into if its shape is the image's.

    Returns:
        (H, W, 3) uint8, as stored (textures not flipped): ``out`` when it was used.
    """
    key = str(sample.get("__key__", "sample"))
    for extension in EXTENSIONS.values():
        member = f"{name}.{extension}"
        if member in sample:
            data = _member(sample, member, key)
            return decode_image(data, extension, f"{key}.{member}", keep_row_filter, out)
    forms = " or ".join(f"{name}.{extension}" for extension in EXTENSIONS.values())
    raise FormatError(f"{key}.{name}", f"a member {forms} of the sample")


def _image(sample: Mapping[str, object], name: str) -> np.ndarray:
    return stored_image(sample, name).astype(np.float32)


def normalise_texture(texture: np.ndarray, meta: EntityMetadata, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's texture treatment.

    Args:
        texture: (T, T, 3) float32 texture as stored in the PNG (not flipped), 0 where unseen.
        meta: entity statistics.
        size: output side (the reference's ``tex_size``).

    Returns:
        (normalised (3, size, size) float32 with unseen texels 0, unseen mask (size, size, 3)
        float32 resized, HWC; 1 where the texel was unseen).
    """
    texture = texture[::-1, ...]
    unseen = texture == 0
    texture -= meta.texmean
    texture /= meta.texstd
    texture[unseen] = 0.0
    resized = cv2.resize(texture, (size, size)).transpose((2, 0, 1))
    return resized, cv2.resize(unseen.astype(np.float32), (size, size))


def decode_sample(
    sample: Mapping[str, object],
    meta: EntityMetadata,
    tex_size: int = 1024,
    fields: Iterable[str] = ALL_FIELDS,
) -> dict[str, object]:
    """Turn a WebDataset sample (member extension -> bytes) into the reference fields.

    Args:
        sample: a dict as ``webdataset.WebDataset`` yields it: ``"photo.png"``, ``"tex.png"``,
            ``"avg_tex.png"`` (or the ``.dzst``, ``.drc`` forms, shards/codecs.py), ``"verts.bin"``,
            ``"transform.txt"``, ``"sample.json"`` bytes.
        meta: the entity's metadata.
        tex_size: side of the returned textures (bilinear resize of the normalised texture).
        fields: the fields to compute (default all); members the others need are not decoded.

    Returns:
        ``photo`` (rows, cols, 3) float32 in [0, 1]; ``tex``, ``avg_tex`` (3, S, S) float32
        normalised; ``mask`` (3, S, S) float32; ``aligned_verts`` (V, 3) float32; ``M`` (3, 4)
        float32; ``view`` (3,) float32; ``transf`` (R, 4) float32; ``cam`` int; ``cam_idx``,
        ``exp``, ``frame`` str; ``uvs`` (Nuv, 2) float32; ``vert_ids``, ``uv_ids`` (F, 3) int32.
    """
    fields = set(fields)
    out = _small_fields(sample, meta, fields)
    if "avg_tex" in fields:
        out["avg_tex"], _ = normalise_texture(_image(sample, "avg_tex"), meta, tex_size)
    if "tex" in fields or "mask" in fields:
        out["tex"], unseen = normalise_texture(_image(sample, "tex"), meta, tex_size)
        out["mask"] = 1.0 - unseen.transpose((2, 0, 1))
    if "photo" in fields:
        out["photo"] = _image(sample, "photo") / 255.0
    return {name: value for name, value in out.items() if name in fields}


ROW_FILTER_FIELD = "image_filter"
"""Field of :func:`decode_stored` with ``keep_row_filter``: ``"up"`` when the sample's images are
still row-filtered (delta-zstd), ``"rice"`` when they are still packed (delta-rice, decoded by
``trainer.gpu_rice``), ``"none"`` when they are pixels (PNG)."""

IMAGE_SHAPES_FIELD = "image_shapes"
"""Field of :func:`decode_stored` with ``keep_row_filter`` on a delta-rice sample: the shape of
each packed image, ``"photo=1334x2048x3 tex=1024x1024x3 ..."`` (see :func:`packed_shapes`)."""


def packed_shapes(text: str) -> dict[str, tuple[int, int, int]]:
    """Parse :data:`IMAGE_SHAPES_FIELD`: image name -> (rows, cols, channels)."""
    shapes = {}
    for item in text.split():
        name, _, size = item.partition("=")
        rows, cols, channels = (int(part) for part in size.split("x"))
        shapes[name] = (rows, cols, channels)
    return shapes


def decode_stored(
    sample: Mapping[str, object],
    meta: EntityMetadata,
    fields: Iterable[str] = ALL_FIELDS,
    keep_row_filter: bool = False,
    out: Mapping[str, np.ndarray] | None = None,
) -> dict[str, object]:
    """Like :func:`decode_sample`, but images stay as stored, for normalising on the GPU.

    ``photo``, ``tex`` and ``avg_tex`` are (H, W, 3) uint8 as stored (textures not flipped, not
    normalised, not resized) and ``mask`` is not computed (it derives from ``tex``):
    ``trainer.gpu_decode.finish_on_device`` turns a batch of these into :func:`decode_sample`'s
    fields. A uint8 sample is a quarter of the float32 one to collate, pin and copy.

    With ``keep_row_filter``, ``delta-zstd`` images are only decompressed, not unfiltered (the
    per-row adds are about half of their CPU decode time; the GPU does them for a whole batch
    at once), ``delta-rice`` images are only copied (the GPU decodes them), and the sample says
    which in :data:`ROW_FILTER_FIELD` (and the packed shapes in :data:`IMAGE_SHAPES_FIELD`).

    ``out`` maps image names to arrays to decode into (a batch slot in shared memory,
    ``trainer.feeder``); an image whose shape differs gets a new array instead.
    """
    fields = set(fields)
    images = fields & {"photo", "avg_tex"} | ({"tex"} if fields & {"tex", "mask"} else set())
    decoded = _small_fields(sample, meta, fields)
    for name in sorted(images):
        decoded[name] = stored_image(sample, name, keep_row_filter, (out or {}).get(name))
    kept = {name: value for name, value in decoded.items() if name in fields | images}
    if keep_row_filter and images:
        packed = [name for name in sorted(images) if f"{name}.{EXTENSIONS['delta-rice']}" in sample]
        filtered = any(f"{name}.{EXTENSIONS['delta-zstd']}" in sample for name in images)
        kept[ROW_FILTER_FIELD] = "rice" if packed else "up" if filtered else "none"
        if packed:
            key = str(sample.get("__key__", "sample"))
            kept[IMAGE_SHAPES_FIELD] = " ".join(
                "{}={}x{}x{}".format(name, *rice.parse_header(_member(sample, f"{name}.drc", key), key))
                for name in packed
            )
    return kept


def _small_fields(sample: Mapping[str, object], meta: EntityMetadata, fields: set[str]) -> dict[str, object]:
    """Every field but the images: camera, pose, projection, vertices, topology."""
    key = str(sample.get("__key__", "sample"))
    info = json.loads(_member(sample, "sample.json", key))
    camera = meta.cameras.get(info["camera"])
    if camera is None:
        raise FormatError(f"{key}.sample.json", f"camera {info['camera']!r} to be in the entity's KRT")
    out: dict[str, object] = {
        "cam_idx": info["camera"],
        "frame": info["frame"],
        "exp": info["expression"],
        "cam": camera.index,
    }
    if fields & {"M", "view", "transf"}:
        transf = parse_transform(_member(sample, "transform.txt", key).decode(), f"{key}.transform.txt")
        rotation_f, translation_f = transf[:3, :3], transf[:3, 3]
        campos = np.dot(rotation_f.T, camera.position - translation_f).astype(np.float32)
        rotation_c, translation_c = camera.extrin[:3, :3], camera.extrin[:3, 3]
        camrot = np.dot(rotation_c, rotation_f).astype(np.float32)
        camt = (np.dot(rotation_c, translation_f) + translation_c).astype(np.float32)
        out["M"] = (camera.intrin @ np.hstack((camrot, camt[None].T))).astype(np.float32)
        out["view"] = campos / np.linalg.norm(campos)
        out["transf"] = transf.astype(np.float32)
    if "uvs" in fields or "vert_ids" in fields or "uv_ids" in fields:
        out["uvs"] = meta.topology.uvs
        out["vert_ids"] = meta.topology.vert_ids
        out["uv_ids"] = meta.topology.uv_ids
    if "aligned_verts" in fields:
        verts = parse_vertices(_member(sample, "verts.bin", key), f"{key}.verts.bin").reshape(-1)
        verts -= meta.vertmean
        verts /= meta.vertstd
        out["aligned_verts"] = verts.reshape((-1, 3)).astype(np.float32)
    return out


def _member(sample: Mapping[str, object], extension: str, key: str) -> bytes:
    value = sample.get(extension)
    if not isinstance(value, bytes | bytearray):
        raise FormatError(f"{key}.{extension}", "a member of the sample (bytes)", found=type(value).__name__)
    return bytes(value)


def sample_decoder(
    meta: EntityMetadata, tex_size: int = 1024, fields: Iterable[str] = ALL_FIELDS
) -> Callable:
    """A one-argument function for ``webdataset.WebDataset(...).map(...)``."""
    fields = tuple(fields)
    members_needed(fields)

    def decode(sample):
        return decode_sample(sample, meta, tex_size, fields)

    return decode
