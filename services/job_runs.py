"""What each kind of job does in its thread, and the progress it reports.

:class:`RunningJob` is a job this process runs: its record, its locks, a cancel event and the
live counters its thread updates. :data:`RUNNERS` maps a job kind to the function its thread
calls (it returns the job's ``result`` or raises); :func:`snapshot` is the record with the
current progress, as the API shows it and as it is flushed to disk. Starting, locking and
recording jobs is :mod:`services.jobs`' part.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from services.catalog import Catalog
from services.download import DownloadConfig
from services.download_job import DownloadProgress, run_release_download
from services.job_records import JobRecord, utc_now
from services.settings import Settings
from shards.ingest import IngestProgress, ingest
from shards.manifest import load_manifest, verify_folder, write_atomic

MAX_EXCLUDED_LISTED = 200
VERIFY_DIR = "verify"
"""Folder under the service folder with the last verify result of each entity."""


class JobCancelled(Exception):
    """A verify job saw its cancel event (ingest and download jobs have their own exceptions)."""


class RunningJob:
    """A job of this process: its record, its locks and the live counters its thread updates.

    ``tick`` is set by the job manager: job bodies call it often (per sample, per block read);
    it flushes the record about once a second and picks up a cancel marker from other processes.
    """

    def __init__(self, record: JobRecord, lock_descriptors: list[int]):
        self.record = record
        self.lock_descriptors = lock_descriptors
        self.cancel = threading.Event()
        self.ingest = IngestProgress()
        self.download = DownloadProgress()
        self.verify_bytes_done = 0
        self.verify_bytes_total = 0
        self.started = time.monotonic()
        self.write_lock = threading.Lock()
        self.last_flush = 0.0
        self.flush_failed = False
        self.thread: threading.Thread | None = None
        self.tick: Callable[[], None] = lambda: None


def run_ingest(job: RunningJob, settings: Settings, catalog: Catalog) -> dict[str, Any]:
    """Write the entity's shards under the shard root, resuming what is published; the manifest's counts."""
    raw = catalog.raw_dir(job.record.entity)
    if raw is None:
        raise FileNotFoundError(f"{job.record.entity}: raw folder disappeared from the data root")
    options = job.record.options
    manifest = ingest(
        raw,
        settings.shard_root,
        workers=options.get("workers") or settings.ingest_workers,
        shard_size=options.get("shard_size") or settings.shard_size,
        progress=job.ingest,
        cancel=job.cancel,
        on_sample=job.tick,
    )
    return {
        "manifest_state": manifest.state,
        "num_shards": len(manifest.shards),
        "num_samples": manifest.num_samples,
        "num_excluded": len(manifest.excluded),
    }


def run_verify(job: RunningJob, settings: Settings, catalog: Catalog) -> dict[str, Any]:
    """Re-hash every published file and store the outcome in ``.service/verify/<entity>.json``."""
    folder = settings.shard_root / job.record.entity
    verify_dir = settings.service_dir / VERIFY_DIR
    manifest = load_manifest(folder)
    job.verify_bytes_total = sum(entry.bytes for entry in manifest.files().values())

    def progress(num_bytes: int) -> None:
        job.verify_bytes_done += num_bytes
        job.tick()
        if job.cancel.is_set():
            raise JobCancelled()

    report = verify_folder(folder, progress=progress)
    if job.cancel.is_set():
        raise JobCancelled()
    result: dict[str, Any] = {
        "job": job.record.id,
        "finished": utc_now(),
        "checked": {name: entry.sha256 for name, entry in manifest.files().items()},
        "problems": {problem.name: dataclasses.asdict(problem) for problem in report.problems},
    }
    for problem in result["problems"].values():
        problem["sha256"] = result["checked"].get(problem["name"])
    verify_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(verify_dir / f"{job.record.entity}.json", json.dumps(result).encode())
    return {"ok": report.ok, "num_files": report.num_files, "num_problems": len(report.problems)}


def run_download(job: RunningJob, settings: Settings, catalog: Catalog) -> dict[str, Any]:
    """Download the job's config into the data root (see :mod:`services.download_job`)."""
    base_url = settings.download_base_url
    if base_url is None:  # checked at start, and settings do not change while the app runs
        raise RuntimeError("download_base_url is unset")
    return run_release_download(
        DownloadConfig.from_dict(job.record.options["config"], source="the job's download config"),
        settings.data_root,
        base_url,
        settings.download_workers,
        job.download,
        job.cancel,
        tick=job.tick,
    )


def snapshot(job: RunningJob) -> JobRecord:
    """A copy of the job's record with its current progress (the fields of ``models.JobProgress``)."""
    record = dataclasses.replace(job.record)
    elapsed = max(1e-9, time.monotonic() - job.started)
    if record.kind == "ingest":
        progress = job.ingest
        excluded = list(progress.excluded)
        record.progress = {
            "samples_done": progress.samples_done,
            "samples_total": progress.samples_total,
            "bytes_done": progress.bytes_done,
            "bytes_per_second": progress.rate,
            "eta_seconds": progress.eta,
            "shards_done": progress.shards_done,
            "shards_total": progress.shards_total,
            "shards_resumed": progress.shards_skipped,
            "num_excluded": len(excluded),
            "excluded": [dataclasses.asdict(item) for item in excluded[:MAX_EXCLUDED_LISTED]],
        }
    elif record.kind == "download":
        record.progress = job.download.snapshot()
    else:
        done, total = job.verify_bytes_done, job.verify_bytes_total
        rate = done / elapsed
        record.progress = {
            "bytes_done": done,
            "bytes_total": total,
            "bytes_per_second": rate,
            "eta_seconds": (total - done) / rate if rate > 0 else None,
        }
    return record


Runner = Callable[[RunningJob, Settings, Catalog], dict[str, Any]]
RUNNERS: dict[str, Runner] = {"ingest": run_ingest, "verify": run_verify, "download": run_download}
