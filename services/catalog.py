"""What the service knows about entities: raw folders, published manifests and their files.

Names are only ever taken from directory listings and manifests, never joined from a request:
an entity name must be one of the folders listed under the data root or the shard root, and a
file must be listed in that entity's published ``manifest.json``. Files are opened component by
component with ``O_NOFOLLOW`` relative to the entity folder, so a symlink anywhere below the
shard root is refused rather than followed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.errors import EntityNotFound, FileMismatch, NotPublished
from services.settings import Settings
from shards.completeness import CompletenessReport, scan_entity
from shards.errors import FormatError
from shards.manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from shards.writer import is_temp_name

logger = logging.getLogger("services.catalog")

_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class PublishedManifest:
    """A manifest as read from disk: parsed, its exact bytes, and their sha256."""

    manifest: Manifest
    data: bytes
    sha256: str


class Catalog:
    """Lists entities and resolves published files; caches manifests by (inode, mtime, size)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._manifests: dict[str, tuple[tuple[int, int, int], PublishedManifest]] = {}
        self._scans: dict[str, tuple[float, CompletenessReport]] = {}

    # Entities -----------------------------------------------------------------------------
    def raw_names(self) -> set[str]:
        """Entity folders under the data root (symlinked folders count: the data root is read only)."""
        return _folders(self.settings.data_root, follow_symlinks=True)

    def shard_names(self) -> set[str]:
        """Entity folders under the shard root (a symlinked folder is ignored, never served)."""
        return _folders(self.settings.shard_root, follow_symlinks=False)

    def names(self) -> list[str]:
        return sorted(self.raw_names() | self.shard_names())

    def require(self, name: str) -> str:
        """Return ``name`` if it is a known entity, else raise :class:`EntityNotFound`."""
        if name in self.raw_names() or name in self.shard_names():
            return name
        raise EntityNotFound(
            f"no entity {name[:200]!r} under the data root or the shard root; GET /api/v1/entities lists them"
        )

    def raw_dir(self, name: str) -> Path | None:
        return self.settings.data_root / name if name in self.raw_names() else None

    def shard_dir(self, name: str) -> Path | None:
        return self.settings.shard_root / name if name in self.shard_names() else None

    # Manifests ----------------------------------------------------------------------------
    def manifest(self, name: str) -> PublishedManifest | None:
        """The entity's published manifest, or None when it has none (or it does not parse)."""
        if name not in self.shard_names():
            return None
        folder = self.settings.shard_root / name
        try:
            descriptor = _open_no_follow(folder, MANIFEST_NAME)
        except (FileNotFoundError, NotPublished):
            return None
        try:
            info = os.fstat(descriptor)
            key = (info.st_ino, info.st_mtime_ns, info.st_size)
            with self._lock:
                cached = self._manifests.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            with os.fdopen(os.dup(descriptor), "rb") as handle:
                data = handle.read()
        finally:
            os.close(descriptor)
        try:
            published = PublishedManifest(
                parse_manifest(data, f"{name}/{MANIFEST_NAME}"), data, hashlib.sha256(data).hexdigest()
            )
        except FormatError as error:
            logger.warning("ignoring unreadable manifest of %s: %s", name, error)
            return None
        with self._lock:
            self._manifests[name] = (key, published)
        return published

    def require_manifest(self, name: str) -> PublishedManifest:
        published = self.manifest(self.require(name))
        if published is None:
            raise NotPublished(f"entity {name!r} has no published manifest yet; start an ingest job")
        return published

    def published_entry(self, name: str, file_name: str) -> FileEntry:
        """The manifest entry of ``file_name`` (e.g. ``shards/E057-000000.tar``), or 404."""
        entry = self.require_manifest(name).manifest.files().get(file_name)
        if entry is None:
            raise NotPublished(f"{file_name[:200]!r} is not in the published manifest of {name!r}")
        return entry

    def open_published(self, name: str, entry: FileEntry) -> int:
        """Open a published file once; the caller owns the descriptor.

        Raises:
            NotPublished: missing on disk, or a symlink / non-regular file is in the way.
            FileMismatch: its size differs from the manifest (truncated or replaced outside ingest).
        """
        descriptor = _open_no_follow(self.settings.shard_root / name, entry.name)
        try:
            size = os.fstat(descriptor).st_size
            if size != entry.bytes:
                raise FileMismatch(
                    f"{name}/{entry.name} is {size} bytes on disk but {entry.bytes} in the manifest; "
                    "it is not served: run a verify job or re-ingest the entity"
                )
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor

    # Completeness -------------------------------------------------------------------------
    def scan(self, name: str) -> CompletenessReport | None:
        """The raw entity's completeness, reused for ``scan_cache_seconds``; None without raw data."""
        raw = self.raw_dir(name)
        if raw is None:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._scans.get(name)
        if cached is not None and now - cached[0] < self.settings.scan_cache_seconds:
            return cached[1]
        report = scan_entity(raw)
        with self._lock:
            self._scans[name] = (now, report)
        return report


def _folders(root: Path, follow_symlinks: bool) -> set[str]:
    names = set()
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or is_temp_name(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    names.add(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return names


def _open_no_follow(folder: Path, relative: str) -> int:
    """Open ``folder/relative`` without following any symlink at or below ``folder``.

    ``relative`` comes from a manifest; it is still checked, since a manifest is a file on disk.
    """
    parts = relative.split("/")
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise NotPublished(f"{relative[:200]!r} is not a plain relative name")
    try:
        current = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _NO_FOLLOW)
    except (FileNotFoundError, NotADirectoryError, OSError) as error:
        raise NotPublished(f"{folder.name}: entity folder unavailable ({error.strerror})") from None
    try:
        for part in parts[:-1]:
            following = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _NO_FOLLOW, dir_fd=current)
            os.close(current)
            current = following
        descriptor = os.open(parts[-1], os.O_RDONLY | _NO_FOLLOW | os.O_NONBLOCK, dir_fd=current)
    except FileNotFoundError:
        raise NotPublished(f"{relative!r} is listed in the manifest but missing on disk") from None
    except OSError:
        # ELOOP (a symlink), ENOTDIR (a symlink or file where a folder should be), EACCES, ...
        raise NotPublished(f"{relative!r} is not a regular file below the entity folder") from None
    finally:
        os.close(current)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NotPublished(f"{relative!r} is not a regular file")
    return descriptor
