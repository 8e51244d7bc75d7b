"""Download jobs: the release downloader run by the data service, into its data root.

``POST /api/v1/downloads`` (see :mod:`services.jobs`) starts one with a download config in the
reference format; this module runs :func:`services.download.download_release_async` in the job's
thread, under its own event loop, and turns the downloader's callbacks into the job's progress:
tars done of the selected tars, bytes done (and the total of the tars whose size is known so
far), rate of this run, an ETA, and the failed tars with their reasons.

The release root comes from the server's settings (``MULTIFACE_DOWNLOAD_BASE_URL``), never from
a request. A cancelled or interrupted download keeps its ``.part`` files and extracted tars;
starting the same download again resumes the parts with HTTP Range and skips what is extracted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.download import (
    DownloadConfig,
    DownloadFailed,
    DownloadReport,
    download_release_async,
    index_path,
)
from services.download.index import TarRecord

POLL_SECONDS = 0.25
"""How often the job's thread looks for a cancel request and flushes progress while it downloads."""
MAX_FAILED_LISTED = 200


class DownloadCancelled(Exception):
    """The job was asked to stop (cancel, or the server shutting down)."""


class ReleaseTarsFailed(RuntimeError):
    """Some selected tars were not extracted; the message names each one and why.

    Attributes:
        result: the job's result all the same (see :func:`report_result`): what was extracted.
    """

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


class DownloadProgress:
    """Live counters of one download job, fed by the downloader's callbacks from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tars: dict[tuple[str, str], TarRecord] = {}
        self._sizes: dict[tuple[str, str], tuple[int, int | None]] = {}
        self._received = 0
        self._started = time.monotonic()

    def on_tar(self, entity_id: str, record: TarRecord) -> None:
        """Listener of :func:`download_release_async`: a selected tar's state changed."""
        if record.selected:
            with self._lock:
                self._tars[entity_id, record.name] = record

    def on_bytes(self, entity_id: str, tar_name: str, done: int, total: int | None) -> None:
        """Byte listener: ``done`` bytes of the tar are on disk, of ``total`` (None: unknown)."""
        with self._lock:
            previous = self._sizes.get((entity_id, tar_name))
            if previous is not None and done > previous[0]:
                self._received += done - previous[0]  # bytes of this run; a resumed offset is not
            self._sizes[entity_id, tar_name] = (done, total)

    def snapshot(self) -> dict[str, Any]:
        """The job's ``progress`` object (see ``services.models.JobProgress``)."""
        with self._lock:
            tars = dict(self._tars)
            sizes = dict(self._sizes)
            received = self._received
        done_bytes, known_total, num_known, num_unknown = 0, 0, 0, 0
        for key, record in tars.items():
            done, total = sizes.get(key, (0, None))
            if record.state == "extracted" and key not in sizes:  # extracted by an earlier run
                done = total = record.bytes or 0
            done_bytes += done
            if total is not None:
                known_total, num_known = known_total + total, num_known + 1
            elif record.state not in ("extracted", "failed"):
                num_unknown += 1
        failed = [
            {"entity_id": entity_id, "name": name, "error": record.error or "failed"}
            for (entity_id, name), record in tars.items()
            if record.state == "failed"
        ]
        rate = received / max(1e-9, time.monotonic() - self._started)
        eta = None
        if rate > 0 and (num_known or not num_unknown):
            # Tars not started yet are assumed to be as large as the average of those started.
            estimated_total = known_total + num_unknown * known_total / max(1, num_known)
            eta = max(0.0, estimated_total - done_bytes) / rate
        return {
            "tars_done": sum(record.state == "extracted" for record in tars.values()),
            "tars_total": len(tars),
            "tars_failed": len(failed),
            "failed": failed[:MAX_FAILED_LISTED],
            "bytes_done": done_bytes,
            "bytes_total": known_total,
            "bytes_per_second": rate,
            "eta_seconds": eta,
        }


def run_release_download(
    config: DownloadConfig,
    dest: Path,
    base_url: str,
    workers: int,
    progress: DownloadProgress,
    cancel: threading.Event,
    tick: Callable[[], None],
) -> dict[str, Any]:
    """Download, verify and extract the tars ``config`` selects into ``dest``; call from the job thread.

    Args:
        config: the validated download config.
        dest: the data root; entities land in ``dest/m--...--<ENTITY_ID>--GHS``.
        base_url: the release root (the server's ``download_base_url``).
        workers: tars downloaded (and extracted) at once.
        progress: receives the downloader's callbacks.
        cancel: set to stop; parts and extracted tars are kept for the next run.
        tick: called about every :data:`POLL_SECONDS` (flushes the job record, reads cancel markers).

    Returns:
        The job's result: per entity, the tars extracted and failed (see :func:`report_result`).

    Raises:
        DownloadCancelled: ``cancel`` was set before the download ended.
        ReleaseTarsFailed: some tars failed (the exception carries the job's result).
        FetchError, ReleaseFormatError: an ``index.html`` or ``CHECKSUM`` could not be read or
            trusted (nothing was written).
    """
    return asyncio.run(_download(config, dest, base_url, workers, progress, cancel, tick))


async def _download(
    config: DownloadConfig,
    dest: Path,
    base_url: str,
    workers: int,
    progress: DownloadProgress,
    cancel: threading.Event,
    tick: Callable[[], None],
) -> dict[str, Any]:
    download = asyncio.create_task(
        download_release_async(
            config,
            dest,
            base_url,
            workers,
            progress=False,
            listener=progress.on_tar,
            byte_listener=progress.on_bytes,
        )
    )
    while not download.done():
        await asyncio.wait({download}, timeout=POLL_SECONDS)
        await asyncio.to_thread(tick)
        if cancel.is_set() and not download.done() and not download.cancelling():
            # Once: a second cancel would also cut the clean-up (the flush of a .part's last bytes).
            download.cancel()
    try:
        report = download.result()
    except asyncio.CancelledError:
        raise DownloadCancelled() from None
    except DownloadFailed as error:
        raise ReleaseTarsFailed(_failure_message(error.report), report_result(error.report)) from None
    return report_result(report)


def _failure_message(report: DownloadReport) -> str:
    failed = report.failed
    num_selected = sum(tar.selected for entity in report.entities for tar in entity.tars)
    reasons = "; ".join(f"{entity_id}/{tar.error or tar.name + ': failed'}" for entity_id, tar in failed)
    return (
        f"{len(failed)} of {num_selected} release tar(s) failed and were not extracted: {reasons}. "
        "Start the download again to retry them; extracted tars are kept"
    )


def report_result(report: DownloadReport) -> dict[str, Any]:
    """The job's ``result``: per entity its folder, index, extracted and failed tars; the warnings."""
    entities = []
    for entity in report.entities:
        selected = [tar for tar in entity.tars if tar.selected]
        entities.append(
            {
                "entity_id": entity.entity_id,
                "folder": entity.root.name if entity.root else None,
                "index": index_path(Path(), entity.entity_id).as_posix(),
                "num_selected": len(selected),
                "extracted": [tar.name for tar in selected if tar.state == "extracted"],
                "failed": [{"name": tar.name, "error": tar.error or "failed"} for tar in entity.failed],
            }
        )
    return {"entities": entities, "warnings": list(report.warnings)}
