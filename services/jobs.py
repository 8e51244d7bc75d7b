"""Ingest, verify and download jobs: one background thread each, state persisted as JSON under the shard root.

A job's record is ``<shard root>/.service/jobs/<job id>.json`` (see :mod:`services.job_records`),
rewritten atomically when it starts, about once a second while it runs, and when it ends. One
job at a time per entity: the runner holds ``flock`` on ``.service/locks/<entity>.lock`` (a
download: ``locks/download/<entity id>.lock`` per entity of its config) for the job's life, so a
second job is refused (409) in this process and in any other worker process, and a record still
marked ``running`` whose locks are free belongs to a process that died: it is reported
``interrupted``. Starting an ingest again resumes it (``shards.ingest`` keeps the shards already
published); starting a download again resumes its ``.part`` files and skips extracted tars. An
ingest or verify is refused while a download of the same entity runs, and the other way round.

A verify job re-hashes every file of the manifest and stores the outcome in
``.service/verify/<entity>.json``, keyed by file name and expected sha256, so the entity's
``verified`` state stays exact as the manifest changes.

A record that cannot be written when its job ends (a full disk) is retried a few times; then the
process keeps it in memory and answers with it (the write error added to ``error``), retries the
write whenever the job is read, and releases the locks anyway. Until the write succeeds the file
still says ``running`` with free locks, so another worker process, or this one after a restart,
reports the job ``interrupted``: never ``running`` forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from services.catalog import Catalog
from services.download import DownloadConfig
from services.download_job import DownloadCancelled, ReleaseTarsFailed
from services.errors import JobConflict, JobNotFound, NotPublished, ServiceError, storage_error
from services.job_records import (
    ACTIVE,
    JOB_ID_RE,
    KINDS,
    TERMINAL,
    JobFiles,
    JobRecord,
    download_lock,
    entity_id_or_none,
    utc_now,
)
from services.job_runs import RUNNERS, VERIFY_DIR, JobCancelled, RunningJob, snapshot
from services.settings import Settings
from shards.ingest import IngestCancelled

logger = logging.getLogger("services.jobs")

__all__ = ["ACTIVE", "JOB_ID_RE", "KINDS", "TERMINAL", "JobManager", "JobRecord"]

FLUSH_SECONDS = 1.0
FINAL_WRITE_RETRIES = (0.1, 0.5, 1.5)
"""Seconds to wait before each new try of writing a job's final record."""
_RETRY = "start the job again"


class NoRawData(ServiceError):
    """An ingest needs the entity's raw folder under the data root."""

    status = 409


class DownloadsDisabled(ServiceError):
    """The server has no release base URL, so it runs no download job."""

    status = 409


class DataRootNotWritable(ServiceError):
    """Download jobs write into the data root, and this one cannot be written."""

    status = 409


class JobManager:
    """Starts, tracks, cancels and recovers jobs; see the module docstring for the files it keeps."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings = settings
        self.catalog = catalog
        self.files = JobFiles(settings.service_dir)
        self.jobs_dir = self.files.jobs_dir
        self.verify_dir = settings.service_dir / VERIFY_DIR
        self._running: dict[str, RunningJob] = {}
        self._unsaved: dict[str, JobRecord] = {}
        """Ended jobs whose final record could not be written yet: this process's word on them."""
        self._guard = threading.Lock()
        self._unsaved_lock = threading.Lock()
        self._shutting_down = False

    # Lifecycle ----------------------------------------------------------------------------
    def recover(self) -> None:
        """Mark the records of jobs no process runs any more as ``interrupted`` (at startup)."""
        for record in self.files.records():
            if record.state in ACTIVE:
                self._settle_orphan(record)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop running jobs (they end ``interrupted`` and resume when started again)."""
        self._shutting_down = True
        with self._guard:
            running = list(self._running.values())
        for job in running:
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for job in running:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))
        for job_id in list(self._unsaved):
            self._save_unsaved(job_id)

    # Queries ------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        if not JOB_ID_RE.match(job_id):
            raise JobNotFound(f"no job {job_id[:100]!r}; job ids look like ingest-20250101T120000-0123abcd")
        with self._guard:
            job = self._running.get(job_id)
        if job is not None:
            return snapshot(job)
        unsaved = self._save_unsaved(job_id)
        if unsaved is not None:
            return unsaved
        record = self.files.read(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id!r}; GET /api/v1/jobs lists them")
        if record.state in ACTIVE:
            record = self._settle_orphan(record)
        return record

    def find(self, entity: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Newest first; ``entity`` selects the jobs that concern it (see :meth:`JobRecord.concerns`)."""
        records = [record for record in self.files.records() if entity is None or record.concerns(entity)]
        records.sort(key=lambda record: record.id.split("-", 1)[1], reverse=True)
        return [
            self.get(record.id) if record.state in ACTIVE or record.id in self._unsaved else record
            for record in records[:limit]
        ]

    def running_for(self, entity: str) -> JobRecord | None:
        return next((record for record in self.find(entity) if record.state in ACTIVE), None)

    def last(self, entity: str, kind: str) -> JobRecord | None:
        return next((record for record in self.find(entity) if record.kind == kind), None)

    def live(self) -> list[JobRecord]:
        """Jobs this process runs now (for metrics and the status page)."""
        with self._guard:
            running = list(self._running.values())
        return [snapshot(job) for job in running]

    def verify_result(self, entity: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.verify_dir / f"{entity}.json").read_bytes())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # Commands -----------------------------------------------------------------------------
    def start(self, kind: str, entity: str, options: dict[str, Any] | None = None) -> JobRecord:
        """Start an ingest or verify job in a background thread.

        Raises:
            JobConflict: a job runs on ``entity``, or a download of its release does.
            InsufficientStorage: the shard root's disk is full (the record cannot be written).
            NotWritable: the shard root refuses the record for another reason.
        """
        assert kind in ("ingest", "verify")
        entity = self.catalog.require(entity)
        if kind == "ingest" and self.catalog.raw_dir(entity) is None:
            raise NoRawData(f"entity {entity!r} has no raw folder under the data root; nothing to ingest")
        if kind == "verify" and self.catalog.manifest(entity) is None:
            raise NotPublished(f"entity {entity!r} has no published manifest to verify; ingest it first")
        record = self._new_record(kind, entity, dict(options or {}))
        entity_id = entity_id_or_none(entity)
        others = [download_lock(entity_id)] if entity_id else []
        return self._launch(record, others)

    def start_download(self, config: DownloadConfig | Mapping[str, Any]) -> JobRecord:
        """Start downloading the release tars ``config`` selects into the data root.

        Args:
            config: a download config, or its JSON object.

        Raises:
            DownloadsDisabled: no ``download_base_url`` is set.
            ConfigError: the config selects nothing, or is malformed; it names the key.
            NotWritable, InsufficientStorage: the data root (or the shard root) cannot be written.
            JobConflict: a download of one of its entities runs, or a job on such an entity's folder.
        """
        if not isinstance(config, DownloadConfig):
            config = DownloadConfig.from_dict(config, source="download request")
        if self.settings.download_base_url is None:
            raise DownloadsDisabled(
                "download jobs are off: this server has no release base URL. Set MULTIFACE_DOWNLOAD_BASE_URL "
                "(or multiface serve --download-base-url) to the release root, e.g. "
                "https://<bucket>.s3.amazonaws.com/MugsyDataRelease/v0.0/identities/, and restart the service"
            )
        self._check_data_root()
        record = self._new_record("download", ",".join(config.entities), {"config": config.to_dict()})
        folders = [name for name in self.catalog.names() if entity_id_or_none(name) in config.entities]
        return self._launch(record, folders)

    def cancel(self, job_id: str) -> JobRecord:
        """Ask a running job to stop; a finished job is returned as it is."""
        record = self.get(job_id)
        if record.state not in ACTIVE:
            return record
        with self._guard:
            job = self._running.get(job_id)
        if job is not None:
            job.record.cancel_requested = True
            job.cancel.set()
            return snapshot(job)
        # Run by another worker process: it polls this marker about once a second.
        self.files.cancel_marker(job_id).touch()
        record.cancel_requested = True
        return record

    def _new_record(self, kind: str, entity: str, options: dict[str, Any]) -> JobRecord:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        return JobRecord(
            id=f"{kind}-{stamp}-{secrets.token_hex(4)}",
            kind=kind,
            entity=entity,
            created=utc_now(),
            options=options,
        )

    def _launch(self, record: JobRecord, conflicting: list[str]) -> JobRecord:
        """Take the record's locks, check no conflicting lock is held, write the record, start the thread."""
        folder = self.settings.service_dir
        try:
            descriptors = self.files.try_lock_all(record.lock_names)
        except OSError as error:
            raise storage_error(
                error, folder / "locks", "cannot start the job: taking its lock", _RETRY
            ) from None
        if descriptors is None:
            raise self._conflict(record.lock_names)
        try:
            busy = [name for name in conflicting if self.files.is_held(name)]
            if busy:
                raise self._conflict(busy)
            self.files.write(record)
        except OSError as error:
            self.files.unlock_all(descriptors)
            raise storage_error(
                error, self.jobs_dir, "cannot start the job: writing its record", _RETRY
            ) from None
        except BaseException:
            self.files.unlock_all(descriptors)
            raise
        job = RunningJob(record, descriptors)
        job.tick = lambda: self._tick(job)
        job.thread = threading.Thread(target=self._run, args=(job,), name=record.id, daemon=True)
        with self._guard:
            self._running[record.id] = job
        job.thread.start()
        logger.info("started %s", record.id)
        return snapshot(job)

    def _conflict(self, lock_names: list[str]) -> JobConflict:
        running = next(
            (
                record
                for record in self.files.records()
                if record.state in ACTIVE and set(record.lock_names) & set(lock_names)
            ),
            None,
        )
        what = ", ".join(name.replace("download/", "the download of entity ") for name in lock_names)
        return JobConflict(
            f"a job already runs on {what}"
            + (f": {running.id}; wait for it to end or cancel it" if running else ""),
            running.id if running else None,
        )

    def _check_data_root(self) -> None:
        """Download jobs write into the data root: refuse at once when they could not."""
        root = self.settings.data_root
        fix = "make it writable for the service (e.g. mount it read-write) or leave MULTIFACE_DOWNLOAD_BASE_URL unset"
        if not root.is_dir():
            raise DataRootNotWritable(
                f"download jobs write into the data root {root}, which is not a folder; {fix}"
            )
        try:
            (root / ".release").mkdir(exist_ok=True)
        except OSError as error:
            raise storage_error(error, root, "cannot start the download: creating .release", _RETRY) from None
        if not os.access(root / ".release", os.W_OK | os.X_OK) or not os.access(root, os.W_OK | os.X_OK):
            raise DataRootNotWritable(
                f"download jobs write into the data root {root}, which is not writable; {fix}"
            )

    # Running ------------------------------------------------------------------------------
    def _run(self, job: RunningJob) -> None:
        record = job.record
        try:
            record.result = RUNNERS[record.kind](job, self.settings, self.catalog)
            record.state = "succeeded"
        except (IngestCancelled, JobCancelled, DownloadCancelled):
            record.state = "interrupted" if self._shutting_down else "cancelled"
            record.error = "server shut down; start the job again to resume" if self._shutting_down else None
        except Exception as error:  # the job's outcome, reported in its record; never kills the server
            if not isinstance(error, ReleaseTarsFailed):
                logger.exception("%s failed", record.id)
            record.state = "failed"
            record.error = f"{type(error).__name__}: {error}"
            if isinstance(error, ReleaseTarsFailed):
                record.result = error.result
        finally:
            record.finished = utc_now()
            with job.write_lock:
                self._save_final(snapshot(job))
            with self._guard:
                self._running.pop(record.id, None)
            with contextlib.suppress(OSError):
                self.files.cancel_marker(record.id).unlink()
            self.files.unlock_all(job.lock_descriptors)
            logger.info("%s ended %s", record.id, record.state)

    def _save_final(self, final: JobRecord) -> None:
        """Write a job's last record, retrying; keep it in memory when the disk still refuses."""
        for delay in (0.0, *FINAL_WRITE_RETRIES):
            time.sleep(delay)
            try:
                self.files.write(final)
                return
            except OSError as error:
                failure = error
        logger.error("%s: the final record could not be written (%s); kept in memory", final.id, failure)
        note = (
            f"the job's final record could not be written to {self.jobs_dir} ({failure.strerror or failure}); "
            "this server reports it from memory and writes it once there is space (after a restart, or "
            "from another worker process, the job reads 'interrupted')"
        )
        final.error = f"{final.error}; {note}" if final.error else note
        with self._unsaved_lock:
            self._unsaved[final.id] = final

    def _save_unsaved(self, job_id: str) -> JobRecord | None:
        """The in-memory record of an ended job not yet on disk (None if none); try to write it again."""
        with self._unsaved_lock:
            record = self._unsaved.get(job_id)
            if record is None:
                return None
            with contextlib.suppress(OSError):
                self.files.write(record)
                del self._unsaved[job_id]
                logger.info("%s: final record written after all", job_id)
            return record

    def _tick(self, job: RunningJob) -> None:
        """Called from job threads: flush progress and pick up a cross-process cancel, once a second."""
        now = time.monotonic()
        if now - job.last_flush < FLUSH_SECONDS:
            return
        job.last_flush = now
        if self.files.cancel_marker(job.record.id).exists():
            job.record.cancel_requested = True
            job.cancel.set()
        if job.write_lock.acquire(blocking=False):
            try:
                self.files.write(snapshot(job))
            except OSError as error:  # progress on disk lags; the job itself goes on
                if not job.flush_failed:
                    logger.warning(
                        "%s: progress not written (%s); retrying every second", job.record.id, error
                    )
                job.flush_failed = True
            finally:
                job.write_lock.release()

    # Orphans ------------------------------------------------------------------------------
    def _settle_orphan(self, record: JobRecord) -> JobRecord:
        """A record says running: if no process holds its locks, it was interrupted."""
        try:
            descriptors = self.files.try_lock_all(record.lock_names)
        except OSError as error:  # a lock file that cannot even be opened: say what the record says
            logger.warning("%s: cannot check its locks (%s)", record.id, error)
            return record
        if descriptors is None:
            return record
        try:
            # Re-read under the locks: the runner writes its final state before it unlocks.
            current = self.files.read(record.id) or record
            if current.state in ACTIVE:
                current.state = "interrupted"
                current.finished = current.finished or utc_now()
                current.error = "the server stopped while this job ran; start it again to resume"
                try:
                    self.files.write(current)
                except OSError as error:  # reported all the same; a later read writes it
                    logger.warning("%s: could not record it as interrupted (%s)", record.id, error)
            return current
        finally:
            self.files.unlock_all(descriptors)
