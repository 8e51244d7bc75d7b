"""Safe extraction of a verified release tar into the entity folder.

Release tars hold paths under the entity root, ``m--YYYYMMDD--HHMM--<ENTITY_ID>--GHS/...`` (the
seed untars them into the destination folder and the entity appears there). Before a single
byte is written, every member is checked; one bad member rejects the whole tar:

- absolute names (``/etc/passwd``, ``C:...``), backslashes, NUL, or a ``..`` component;
- anything but regular files and folders: symbolic links, hard links, devices, FIFOs;
- a name that appears twice, or a file that is also the parent of another member;
- a member outside the one entity root, or a root of another entity.

An accepted tar is written into a fresh staging folder (never through ``tarfile.extract``: each
file is opened by the path built from its checked parts) and then moved file by file into
the destination with ``os.replace``, so a rerun after a crash simply extracts it again.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.download.errors import HostileTarError, TarError
from shards.layout import ENTITY_NAME_RE

COPY_CHUNK = 1 << 20
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class TarPlan:
    """The checked content of a tar.

    Attributes:
        root: the entity folder name every member lives under.
        files: (member, path parts) of each regular file, in tar order.
        folders: path parts of each folder member.
    """

    root: str
    files: tuple[tuple[tarfile.TarInfo, tuple[str, ...]], ...]
    folders: tuple[tuple[str, ...], ...]


def _member_parts(tar_name: str, member: tarfile.TarInfo) -> tuple[str, ...]:
    name = member.name
    if "\x00" in name:
        raise HostileTarError(tar_name, name, "contains a NUL byte")
    if name.startswith("/") or _DRIVE_RE.match(name):
        raise HostileTarError(tar_name, name, "is an absolute path")
    if "\\" in name:
        raise HostileTarError(tar_name, name, "contains a backslash")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise HostileTarError(tar_name, name, "climbs out of the destination with '..'")
    if not parts:
        raise HostileTarError(tar_name, name, "has an empty name")
    if member.issym():
        raise HostileTarError(tar_name, name, f"is a symbolic link (to {member.linkname!r})")
    if member.islnk():
        raise HostileTarError(tar_name, name, f"is a hard link (to {member.linkname!r})")
    if member.ischr() or member.isblk():
        raise HostileTarError(tar_name, name, "is a device file")
    if member.isfifo():
        raise HostileTarError(tar_name, name, "is a FIFO")
    if not (member.isreg() or member.isdir()):
        raise HostileTarError(tar_name, name, f"is not a regular file or folder (tar type {member.type!r})")
    return parts


def plan_tar(archive: tarfile.TarFile, tar_name: str, entity_id: str) -> TarPlan:
    """Check every member of an open tar; write nothing.

    Args:
        archive: the tar, opened for reading.
        tar_name: its release name, for messages.
        entity_id: the entity it must belong to, e.g. ``6795937``.

    Raises:
        HostileTarError: naming the first offending member and why.
    """
    root: str | None = None
    seen: set[tuple[str, ...]] = set()
    files: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
    folders: list[tuple[str, ...]] = []
    for member in archive.getmembers():
        parts = _member_parts(tar_name, member)
        match = ENTITY_NAME_RE.match(parts[0])
        if match is None or match["entity_id"] != entity_id:
            raise HostileTarError(
                tar_name, member.name, f"is not under an entity folder 'm--YYYYMMDD--HHMM--{entity_id}--GHS'"
            )
        if root is None:
            root = parts[0]
        elif parts[0] != root:
            raise HostileTarError(
                tar_name, member.name, f"is under {parts[0]!r} but other members under {root!r}"
            )
        if parts in seen:
            raise HostileTarError(tar_name, member.name, "appears twice in the tar")
        seen.add(parts)
        if member.isdir():
            folders.append(parts)
        else:
            if len(parts) == 1:
                raise HostileTarError(tar_name, member.name, "is a file where the entity folder should be")
            files.append((member, parts))
    file_paths = {parts for _member, parts in files}
    for parts in sorted(seen):
        for depth in range(1, len(parts)):
            if parts[:depth] in file_paths:
                raise HostileTarError(
                    tar_name, "/".join(parts), f"lies under {'/'.join(parts[:depth])!r}, which is a file"
                )
    if root is None:
        raise TarError(tar_name, "is empty; expected files under the entity folder")
    return TarPlan(root, tuple(files), tuple(folders))


def _check_no_symlink(dest: Path, folder: Path, checked: set[Path]) -> None:
    """Refuse to write through a symlink that already sits in the destination tree."""
    current = folder
    while current != dest and current not in checked:
        if current.is_symlink():
            raise TarError(str(folder), f"{current} is a symbolic link; refusing to extract through it")
        checked.add(current)
        current = current.parent


def extract_tar(
    tar_path: Path,
    tar_name: str,
    entity_id: str,
    dest: Path,
    staging: Path,
    claim_root: Callable[[str], None] | None = None,
) -> TarPlan:
    """Check a tar, extract it into ``staging``, then move its files into ``dest``.

    Args:
        tar_path: the verified tar on disk.
        tar_name: its release name, for messages.
        entity_id: the entity it must belong to.
        dest: the download destination; files land in ``dest/<root>/...``.
        staging: a folder of its own for this tar (emptied first, removed at the end).
        claim_root: called with the tar's entity folder name once the tar is checked and before
            anything is written; it raises :class:`TarError` to refuse a root that differs from
            the one the entity's other tars use.

    Returns:
        The checked plan (its ``root`` is the entity folder name).

    Raises:
        HostileTarError: the tar was rejected before anything was written, staging included.
        TarError: the tar cannot be read.
    """
    try:
        with tarfile.open(tar_path, mode="r:*") as archive:
            plan = plan_tar(archive, tar_name, entity_id)
            if claim_root is not None:
                claim_root(plan.root)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            for member, parts in plan.files:
                target = staging.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None, member.name
                with source, open(target, "xb") as out:
                    shutil.copyfileobj(source, out, COPY_CHUNK)
                os.utime(target, (member.mtime, member.mtime))
    except tarfile.TarError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise TarError(tar_name, f"is not a readable tar ({error})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checked: set[Path] = set()
    dest = dest.resolve()
    for parts in plan.folders:
        folder = dest.joinpath(*parts)
        _check_no_symlink(dest, folder, checked)
        folder.mkdir(parents=True, exist_ok=True)
    for _member, parts in plan.files:
        target = dest.joinpath(*parts)
        _check_no_symlink(dest, target.parent, checked)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging.joinpath(*parts), target)
    shutil.rmtree(staging, ignore_errors=True)
    return plan
