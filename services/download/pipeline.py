"""Download a Multiface release: read each entity's index, then fetch, verify and extract its tars.

Order of work, per run:

1. For every entity in the config, ``index.html`` and ``CHECKSUM`` are read into memory and
   parsed in full. Any malformed ``CHECKSUM`` rejects the run here, before a file is written.
2. The destination folder is created (the seed never did) with ``.release/<entity_id>/``
   holding ``index.json`` (see :mod:`services.download.index`), ``tars/`` (``.part`` files and
   verified tars) and ``staging/`` (one folder per tar being extracted).
3. Selected tars download ``workers`` at a time. Each one's md5 is compared with ``CHECKSUM``;
   a mismatch after a resumed download is retried once from byte 0, and a mismatch after that
   (or on a fresh download) fails the tar: the tar is deleted and nothing from it is extracted.
4. A verified tar is checked member by member and extracted (:mod:`services.download.extract`)
   into ``<dest>/m--YYYYMMDD--HHMM--<ENTITY_ID>--GHS/``, then deleted unless ``keep_tars``.

Tars that fail never stop the others; at the end :class:`DownloadFailed` names each failed
tar and why (the seed skipped a tar that failed its md5 without a word). A rerun skips the
tars ``index.json`` lists as extracted (same name and md5) and resumes ``.part`` files with
HTTP Range; delete ``index.json`` to extract everything again.

From synchronous code call :func:`download_release`; from a running event loop (the data
service) await :func:`download_release_async`, or run the former in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from services.download.config import DownloadConfig, as_config
from services.download.errors import ChecksumMismatch, DownloadFailed, HostileTarError, TarError
from services.download.extract import extract_tar
from services.download.fetch import (
    RetryPolicy,
    discard_part,
    download_part,
    fetch_text,
    file_md5,
    open_session,
    publish_part,
)
from services.download.index import (
    IndexWriter,
    ReleaseIndex,
    TarRecord,
    index_path,
    load_index,
    release_dir,
)
from services.download.release import (
    CHECKSUM_NAME,
    INDEX_NAME,
    Release,
    ReleaseTar,
    build_release,
    entity_url,
    parse_checksum,
    parse_index,
)
from services.download.report import DownloadReport, EntityReport

DEFAULT_BASE_URL = (
    "https://fb-baas-f32eacb9-8abb-11eb-b2b8-4857dd089e15.s3.amazonaws.com/MugsyDataRelease/v0.0/identities/"
)
DEFAULT_WORKERS = 4
TARS_DIR = "tars"
STAGING_DIR = "staging"

log = logging.getLogger(__name__)

UpdateListener = Callable[[str, TarRecord], None]
"""Called as ``listener(entity_id, record)`` once per tar of the release when its index is opened
(state ``absent``, or ``extracted`` by an earlier run), then after every state change of a tar,
possibly from a worker thread."""
ByteListener = Callable[[str, str, int, int | None], None]
"""Called as ``byte_listener(entity_id, tar_name, bytes_on_disk, total_or_None)`` while a tar downloads."""


class _Bars:
    """Two tqdm bars: bytes of all tars, and tars done."""

    def __init__(self, enabled: bool, num_tars: int, listener: ByteListener | None = None):
        options: dict[str, Any] = {"file": sys.stderr, "dynamic_ncols": True, "disable": not enabled}
        self.bytes = tqdm(
            total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="bytes", position=0, **options
        )
        self.tars = tqdm(total=num_tars, unit="tar", desc="tars", position=1, **options)
        self._sizes: dict[tuple[str, str], tuple[int, int | None]] = {}
        self._listener = listener

    def report(self, entity_id: str, tar_name: str) -> Callable[[int, int | None], None]:
        def update(done: int, total: int | None) -> None:
            self._sizes[entity_id, tar_name] = (done, total)
            self.bytes.total = sum(t if t is not None else d for d, t in self._sizes.values())
            self.bytes.update(sum(d for d, _ in self._sizes.values()) - self.bytes.n)
            if self._listener is not None:
                self._listener(entity_id, tar_name, done, total)

        return update

    def close(self) -> None:
        self.bytes.close()
        self.tars.close()


class _Entity:
    """Per-entity state of a run: its release, its index writer, its folder root."""

    def __init__(self, release: Release, writer: IndexWriter, folder: Path):
        self.release = release
        self.writer = writer
        self.folder = folder
        self._root_lock = threading.Lock()

    def claim_root(self, tar_name: str) -> Callable[[str], None]:
        def claim(root: str) -> None:
            with self._root_lock:
                known = self.writer.index.root
                if known is not None and known != root:
                    raise TarError(
                        tar_name, f"holds entity folder {root!r}, but the entity's other tars use {known!r}"
                    )
                if known is None:
                    self.writer.set_root(root)

        return claim


async def _read_release(
    session: aiohttp.ClientSession, base_url: str, entity_id: str, config: DownloadConfig, policy: RetryPolicy
) -> Release:
    folder_url = entity_url(base_url, entity_id)
    index_url = folder_url + INDEX_NAME
    html = await fetch_text(session, index_url, f"{entity_id}/{INDEX_NAME}", policy)
    links = parse_index(html, index_url)
    checksum_url = links.get(CHECKSUM_NAME, folder_url + CHECKSUM_NAME)
    text = await fetch_text(session, checksum_url, f"{entity_id}/{CHECKSUM_NAME}", policy)
    return build_release(entity_id, index_url, links, parse_checksum(text, checksum_url), config)


def _open_index(dest: Path, release: Release, base_url: str, listener: UpdateListener | None) -> IndexWriter:
    """Index of this run, carrying over tars an earlier run extracted (same name and md5)."""
    path = index_path(dest, release.entity_id)
    (path.parent / TARS_DIR).mkdir(parents=True, exist_ok=True)
    previous = load_index(path)
    earlier = {tar.name: tar for tar in previous.tars} if previous else {}
    records = []
    for tar in release.tars:
        record = TarRecord(tar.name, tar.md5, tar.selected)
        old = earlier.get(tar.name)
        if old is not None and old.md5 == tar.md5 and tar.md5 is not None and old.state == "extracted":
            record.state, record.bytes = "extracted", old.bytes
        records.append(record)
    root = previous.root if previous else None
    index = ReleaseIndex(release.entity_id, base_url, release.index_url, root, records)
    notify = None
    if listener is not None:

        def notify(record: TarRecord) -> None:
            listener(release.entity_id, replace(record))

    writer = IndexWriter(path, index, notify)
    writer.write()
    if notify is not None:
        for record in records:
            notify(record)
    return writer


async def _fetch_verified(
    session: aiohttp.ClientSession,
    tar: ReleaseTar,
    folder: Path,
    writer: IndexWriter,
    policy: RetryPolicy,
    bars: _Bars,
) -> Path:
    """Return the path of the tar with its md5 checked against CHECKSUM, downloading what is needed."""
    assert tar.md5 is not None
    final = folder / tar.name
    if final.exists():
        if await asyncio.to_thread(file_md5, final) == tar.md5:
            return final
        final.unlink()
    report = bars.report(writer.index.entity_id, tar.name)
    part = await download_part(session, tar.name, tar.url, folder, policy, report)
    writer.update(tar.name, persist=False, state="downloaded", bytes=part.size, error=None)
    if part.md5 != tar.md5 and part.resumed:
        log.warning(
            "%s: md5 mismatch after a resumed download; downloading it again from the start", tar.name
        )
        discard_part(folder, tar.name)
        part = await download_part(session, tar.name, tar.url, folder, policy, report)
        writer.update(tar.name, persist=False, state="downloaded", bytes=part.size)
    if part.md5 != tar.md5:
        discard_part(folder, tar.name)
        raise ChecksumMismatch(
            tar.name,
            f"md5 of the downloaded bytes is {part.md5} but CHECKSUM says {tar.md5}; "
            "the tar was deleted and nothing from it was extracted",
        )
    publish_part(part, final)
    return final


async def _process_tar(
    entity: _Entity,
    tar: ReleaseTar,
    dest: Path,
    session: aiohttp.ClientSession,
    downloads: asyncio.Semaphore,
    extractions: asyncio.Semaphore,
    policy: RetryPolicy,
    bars: _Bars,
    keep_tars: bool,
) -> None:
    writer = entity.writer
    try:
        if writer.index.record(tar.name).state == "extracted":
            return
        if tar.md5 is None:
            raise TarError(tar.name, "has no line in CHECKSUM; a tar that cannot be verified is never used")
        async with downloads:
            final = await _fetch_verified(session, tar, entity.folder / TARS_DIR, writer, policy, bars)
        await asyncio.to_thread(writer.update, tar.name, state="verified", error=None)
        async with extractions:
            staging = entity.folder / STAGING_DIR / tar.name
            claim = entity.claim_root(tar.name)
            await asyncio.to_thread(
                extract_tar, final, tar.name, entity.release.entity_id, dest, staging, claim
            )
        if not keep_tars:
            final.unlink(missing_ok=True)
        await asyncio.to_thread(writer.update, tar.name, state="extracted", error=None)
    except (TarError, OSError) as error:
        message = str(error) if isinstance(error, TarError) else f"{tar.name}: {error}"
        log.error("%s", message)
        if isinstance(error, HostileTarError) and not keep_tars:  # never usable; a disk-full one is kept
            (entity.folder / TARS_DIR / tar.name).unlink(missing_ok=True)
        await asyncio.to_thread(writer.update, tar.name, state="failed", error=message)
    finally:
        bars.tars.update(1)


def _warnings(release: Release, config: DownloadConfig) -> list[str]:
    """Settings that select nothing in this release, and tar names the downloader does not know."""
    found: list[str] = []
    entity = release.entity_id
    for expression in release.unmatched_expressions:
        found.append(f"entity {entity}: expression {expression!r} selects no tar in the release")
    for asset in ("metadata", "audio", "image", "texture", "mesh"):
        if getattr(config, asset) and not any(t.asset == asset and t.selected for t in release.tars):
            found.append(f"entity {entity}: {asset!r} is true but no {asset} tar of the release was selected")
    unknown = [tar.name for tar in release.tars if tar.asset is None]
    if unknown:
        found.append(
            f"entity {entity}: {len(unknown)} tar(s) with unknown names were not fetched, e.g. {unknown[0]}"
        )
    return found


async def download_release_async(
    config: DownloadConfig | Mapping[str, Any] | str | Path,
    dest: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    workers: int = DEFAULT_WORKERS,
    progress: bool = True,
    *,
    policy: RetryPolicy | None = None,
    keep_tars: bool = False,
    listener: UpdateListener | None = None,
    byte_listener: ByteListener | None = None,
) -> DownloadReport:
    """Async form of :func:`download_release`, for callers that already run an event loop.

    Cancelling the task stops the downloads; ``.part`` files keep the bytes received, so a later
    run resumes them (an extraction in progress finishes first: it runs in a worker thread).
    """
    config = as_config(config)
    if workers < 1:
        raise ValueError(f"workers={workers}: use 1 or more parallel downloads")
    dest = Path(dest)
    policy = policy or RetryPolicy()
    async with open_session(policy, workers) as session:
        releases = await asyncio.gather(
            *(_read_release(session, base_url, entity, config, policy) for entity in config.entities)
        )
        dest.mkdir(parents=True, exist_ok=True)
        report = DownloadReport(dest.resolve())
        entities = []
        for release in releases:
            writer = _open_index(dest, release, base_url, listener)
            entities.append(_Entity(release, writer, release_dir(dest, release.entity_id)))
            report.warnings.extend(_warnings(release, config))
        for warning in report.warnings:
            log.warning("%s", warning)
        bars = _Bars(progress, sum(len(release.selected) for release in releases), byte_listener)
        downloads, extractions = asyncio.Semaphore(workers), asyncio.Semaphore(workers)
        try:
            async with asyncio.TaskGroup() as group:
                for entity in entities:
                    for tar in entity.release.selected:
                        group.create_task(
                            _process_tar(
                                entity, tar, dest, session, downloads, extractions, policy, bars, keep_tars
                            )
                        )
        finally:
            bars.close()
    for entity in entities:
        for leftover in (STAGING_DIR, TARS_DIR):
            try:
                (entity.folder / leftover).rmdir()
            except OSError:  # not empty (kept tars, .part files): keep it
                pass
        root = entity.writer.index.root
        report.entities.append(
            EntityReport(
                entity.release.entity_id,
                report.dest / root if root else None,
                entity.writer.path,
                [replace(tar) for tar in entity.writer.index.tars],
            )
        )
    if report.failed:
        raise DownloadFailed(report, [(tar.name, tar.error or "failed") for _, tar in report.failed])
    return report


def download_release(
    config: DownloadConfig | Mapping[str, Any] | str | Path,
    dest: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    workers: int = DEFAULT_WORKERS,
    progress: bool = True,
    *,
    policy: RetryPolicy | None = None,
    keep_tars: bool = False,
    listener: UpdateListener | None = None,
    byte_listener: ByteListener | None = None,
) -> DownloadReport:
    """Download, verify and extract the release tars that ``config`` selects into ``dest``.

    Args:
        config: a :class:`DownloadConfig`, the seed's JSON object as a mapping, or a path to it.
        dest: destination folder (created); entities land in ``dest/m--...--<ENTITY_ID>--GHS``.
        base_url: release root holding one folder per entity id (default: the seed's S3 root).
        workers: tars downloaded at once (and extracted at once).
        progress: show tqdm bars for bytes and tars on stderr.
        policy: retries, backoff and timeouts (default :class:`RetryPolicy`).
        keep_tars: keep verified tars under ``dest/.release/<id>/tars`` after extraction.
        listener: called with every tar's initial state, then after each change (see
            :data:`UpdateListener`; the data service's download jobs use it).
        byte_listener: called as bytes of a tar arrive (see :data:`ByteListener`).

    Returns:
        The report; every selected tar is extracted.

    Raises:
        ConfigError: the config is invalid (nothing fetched).
        ReleaseFormatError: an ``index.html`` or ``CHECKSUM`` is malformed (nothing written).
        FetchError: an ``index.html`` or ``CHECKSUM`` could not be fetched (nothing written).
        DownloadFailed: some tars failed; its ``report`` and message name each one and why.
    """
    return asyncio.run(
        download_release_async(
            config,
            dest,
            base_url,
            workers,
            progress,
            policy=policy,
            keep_tars=keep_tars,
            listener=listener,
            byte_listener=byte_listener,
        )
    )
