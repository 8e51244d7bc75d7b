"""The shard manifest: what an ingest published, with sizes and sha256, and how to verify it.

The manifest is JSON (schema in ``shards/README.md``), rewritten atomically after each shard is
published, with ``state`` "partial" until the last shard and "complete" after. It holds no
timestamps, so two ingests of the same input write identical manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.codecs import IMAGE_CODECS
from shards.errors import FormatError

FORMAT_NAME = "multiface-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
META_DIR = "meta"
HASH_CHUNK = 1 << 20


@dataclass
class FileEntry:
    """A published file, named by its path relative to the manifest's folder."""

    name: str
    bytes: int
    sha256: str


@dataclass
class ShardEntry(FileEntry):
    num_samples: int = 0
    expressions: list[str] = field(default_factory=list)
    cameras: list[str] = field(default_factory=list)
    samples_per_camera: dict[str, int] = field(default_factory=dict)
    photos: FileEntry | None = None
    """The companion shard holding this shard's photos (``ingest --photo-shards``), else None."""


def photo_shard_name(name: str) -> str:
    """``shards/E057-000000.tar`` -> ``shards/E057-000000.photo.tar``: its photos' companion."""
    return f"{name.removesuffix('.tar')}.photo.tar"


@dataclass
class ExcludedSample:
    """A sample the ingest left out, with the file at fault and why."""

    key: str
    path: str
    reason: str


@dataclass
class Manifest:
    entity: str
    entity_id: str
    state: str = "partial"
    shard_size: int = 0
    num_planned_shards: int = 0
    cameras: list[str] = field(default_factory=list)
    expressions: list[str] = field(default_factory=list)
    metadata: list[FileEntry] = field(default_factory=list)
    shards: list[ShardEntry] = field(default_factory=list)
    excluded: list[ExcludedSample] = field(default_factory=list)
    image_codec: str = "png"
    photo_shards: bool = False

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    def to_dict(self) -> dict:
        body = asdict(self)
        if body["image_codec"] == "png":
            # Optional field: PNG manifests stay byte-identical to those of earlier versions.
            del body["image_codec"]
        if not body["photo_shards"]:
            del body["photo_shards"]  # optional too, and each shard's "photos" with it
        for shard in body["shards"]:
            if shard["photos"] is None:
                del shard["photos"]
        body["shards"] = sorted(body["shards"], key=lambda shard: shard["name"])
        body["excluded"] = sorted(body["excluded"], key=lambda item: (item["key"], item["path"]))
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **body,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, body: dict, source: str = MANIFEST_NAME) -> Manifest:
        if body.get("format") != FORMAT_NAME:
            raise FormatError(source, f'"format": "{FORMAT_NAME}"', found=str(body.get("format")))
        if body.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                source,
                f"format_version {FORMAT_VERSION} (re-ingest with this version of multiface)",
                found=str(body.get("format_version")),
            )
        try:
            return cls(
                entity=body["entity"],
                entity_id=body["entity_id"],
                state=body["state"],
                shard_size=body["shard_size"],
                num_planned_shards=body["num_planned_shards"],
                cameras=list(body["cameras"]),
                expressions=list(body["expressions"]),
                metadata=[FileEntry(**entry) for entry in body["metadata"]],
                shards=[_shard_entry(entry) for entry in body["shards"]],
                excluded=[ExcludedSample(**entry) for entry in body["excluded"]],
                image_codec=_image_codec(body, source),
                photo_shards=bool(body.get("photo_shards", False)),
            )
        except (KeyError, TypeError) as error:
            raise FormatError(source, f"a complete manifest ({error})") from None

    def files(self) -> dict[str, FileEntry]:
        """Every published file (metadata, shards, photo shards) by name: the only names ever served."""
        photos = [shard.photos for shard in self.shards if shard.photos is not None]
        return {entry.name: entry for entry in [*self.metadata, *self.shards, *photos]}


def _shard_entry(entry: dict) -> ShardEntry:
    photos = entry.get("photos")
    return ShardEntry(**{**entry, "photos": FileEntry(**photos) if photos is not None else None})


def _image_codec(body: dict, source: str) -> str:
    codec = body.get("image_codec", "png")
    if codec not in IMAGE_CODECS:
        raise FormatError(
            source,
            f'"image_codec" one of {", ".join(IMAGE_CODECS)} (upgrade multiface to read this manifest)',
            found=repr(codec),
        )
    return codec


def encode_manifest(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=1) + "\n").encode()


def parse_manifest(data: bytes, source: str = MANIFEST_NAME) -> Manifest:
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(source, f"manifest JSON ({error})") from None
    if not isinstance(body, dict):
        raise FormatError(source, "a JSON object")
    return Manifest.from_dict(body, source)


def load_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no manifest; run 'multiface ingest ENTITY_DIR --out {folder.parent}' first"
        ) from None
    return parse_manifest(data, str(path))


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part: temp, fsync, rename."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a full disk must not keep a half-written temp file
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_manifest(folder: Path, manifest: Manifest) -> None:
    write_atomic(folder / MANIFEST_NAME, encode_manifest(manifest))


def sha256_file(path: Path) -> tuple[int, str]:
    """Size and sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class VerifyProblem:
    name: str
    problem: str  # "missing", "size", "sha256"
    detail: str


@dataclass
class VerifyReport:
    folder: str
    state: str
    num_files: int
    num_bytes: int
    problems: list[VerifyProblem]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_folder(folder: Path, progress=None) -> VerifyReport:
    """Re-hash every file a manifest lists; report missing, wrong-size and corrupt files.

    Args:
        folder: an entity's shard folder (holds ``manifest.json``).
        progress: optional callable taking the number of bytes hashed since the last call.
    """
    manifest = load_manifest(folder)
    problems = []
    total = 0
    for entry in manifest.files().values():
        path = folder / entry.name
        if not path.is_file():
            problems.append(VerifyProblem(entry.name, "missing", f"{path} does not exist"))
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems.append(VerifyProblem(entry.name, "size", f"{size} bytes, manifest says {entry.bytes}"))
            continue
        _, digest = sha256_file(path)
        total += size
        if progress is not None:
            progress(size)
        if digest != entry.sha256:
            problems.append(
                VerifyProblem(entry.name, "sha256", f"sha256 {digest}, manifest says {entry.sha256}")
            )
    return VerifyReport(str(folder), manifest.state, len(manifest.files()), total, problems)
