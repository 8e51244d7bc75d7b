"""Ingest and verify jobs: one background thread each, state persisted as JSON under the shard root.

A job's record is ``<shard root>/.service/jobs/<job id>.json``, rewritten atomically when it
starts, about once a second while it runs, and when it ends. One job at a time per entity: the
runner holds ``flock`` on ``.service/locks/<entity>.lock`` for the job's life, so a second job is
refused (409) in this process and in any other worker process, and a record still marked
``running`` whose lock is free belongs to a process that died: it is reported ``interrupted``.
Starting an ingest again resumes it (``shards.ingest`` keeps the shards already published).

A verify job re-hashes every file of the manifest and stores the outcome in
``.service/verify/<entity>.json``, keyed by file name and expected sha256, so the entity's
``verified`` state stays exact as the manifest changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from typing import Any

from services.catalog import Catalog
from services.errors import JobConflict, JobNotFound, NotPublished, ServiceError
from services.settings import Settings
from shards.ingest import IngestCancelled, IngestProgress, ingest
from shards.manifest import load_manifest, verify_folder, write_atomic

logger = logging.getLogger("services.jobs")

KINDS = ("ingest", "verify")
ACTIVE = ("running",)
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")
JOB_ID_RE = re.compile(r"^(ingest|verify)-\d{8}T\d{6}-[0-9a-f]{8}$")
FLUSH_SECONDS = 1.0
MAX_EXCLUDED_LISTED = 200


class NoRawData(ServiceError):
    """An ingest needs the entity's raw folder under the data root."""

    status = 409


@dataclasses.dataclass
class JobRecord:
    """What a job did and is doing; the JSON file and the API response carry the same fields."""

    id: str
    kind: str
    entity: str
    state: str = "running"
    created: str = ""
    finished: str | None = None
    cancel_requested: bool = False
    error: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: dict[str, Any] = dataclasses.field(default_factory=dict)
    result: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> JobRecord:
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in body.items() if key in fields})


class _Cancelled(Exception):
    pass


class _Running:
    """A job of this process: its record, its lock and the live counters its thread updates."""

    def __init__(self, record: JobRecord, lock_descriptor: int):
        self.record = record
        self.lock_descriptor = lock_descriptor
        self.cancel = threading.Event()
        self.ingest = IngestProgress()
        self.verify_bytes_done = 0
        self.verify_bytes_total = 0
        self.started = time.monotonic()
        self.write_lock = threading.Lock()
        self.last_flush = 0.0
        self.thread: threading.Thread | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobManager:
    """Starts, tracks, cancels and recovers jobs; see the module docstring for the files it keeps."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings = settings
        self.catalog = catalog
        self.jobs_dir = settings.service_dir / "jobs"
        self.locks_dir = settings.service_dir / "locks"
        self.verify_dir = settings.service_dir / "verify"
        self._running: dict[str, _Running] = {}
        self._guard = threading.Lock()
        self._shutting_down = False

    # Lifecycle ----------------------------------------------------------------------------
    def recover(self) -> None:
        """Mark the records of jobs no process runs any more as ``interrupted`` (at startup)."""
        for record in self._records():
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

    # Queries ------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        if not JOB_ID_RE.match(job_id):
            raise JobNotFound(f"no job {job_id[:100]!r}; job ids look like ingest-20250101T120000-0123abcd")
        with self._guard:
            job = self._running.get(job_id)
        if job is not None:
            return self._snapshot(job)
        record = self._read(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id!r}; GET /api/v1/jobs lists them")
        if record.state in ACTIVE:
            record = self._settle_orphan(record)
        return record

    def find(self, entity: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        records = [record for record in self._records() if entity is None or record.entity == entity]
        records.sort(key=lambda record: record.id.split("-", 1)[1], reverse=True)
        return [self.get(record.id) if record.state in ACTIVE else record for record in records[:limit]]

    def running_for(self, entity: str) -> JobRecord | None:
        return next((record for record in self.find(entity) if record.state in ACTIVE), None)

    def last(self, entity: str, kind: str) -> JobRecord | None:
        return next((record for record in self.find(entity) if record.kind == kind), None)

    def live(self) -> list[JobRecord]:
        """Jobs this process runs now (for metrics and the status page)."""
        with self._guard:
            running = list(self._running.values())
        return [self._snapshot(job) for job in running]

    def verify_result(self, entity: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.verify_dir / f"{entity}.json").read_bytes())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # Commands -----------------------------------------------------------------------------
    def start(self, kind: str, entity: str, options: dict[str, Any] | None = None) -> JobRecord:
        """Start a job in a background thread; raise :class:`JobConflict` if one runs on ``entity``."""
        assert kind in KINDS
        entity = self.catalog.require(entity)
        if kind == "ingest" and self.catalog.raw_dir(entity) is None:
            raise NoRawData(f"entity {entity!r} has no raw folder under the data root; nothing to ingest")
        if kind == "verify" and self.catalog.manifest(entity) is None:
            raise NotPublished(f"entity {entity!r} has no published manifest to verify; ingest it first")
        descriptor = self._try_lock(entity)
        if descriptor is None:
            running = self.running_for(entity)
            raise JobConflict(
                f"a job already runs on {entity!r}" + (f": {running.id}" if running else ""),
                running.id if running else None,
            )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        record = JobRecord(
            id=f"{kind}-{stamp}-{secrets.token_hex(4)}",
            kind=kind,
            entity=entity,
            created=_now(),
            options=dict(options or {}),
        )
        job = _Running(record, descriptor)
        try:
            self._write(record)
        except BaseException:
            self._unlock(descriptor)
            raise
        target = self._run_ingest if kind == "ingest" else self._run_verify
        job.thread = threading.Thread(target=self._run, args=(job, target), name=record.id, daemon=True)
        with self._guard:
            self._running[record.id] = job
        job.thread.start()
        logger.info("started %s", record.id)
        return self._snapshot(job)

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
            return self._snapshot(job)
        # Run by another worker process: it polls this marker about once a second.
        (self.jobs_dir / f"{job_id}.cancel").touch()
        record.cancel_requested = True
        return record

    # Running ------------------------------------------------------------------------------
    def _run(self, job: _Running, target) -> None:
        record = job.record
        try:
            record.result = target(job)
            record.state = "succeeded"
        except (IngestCancelled, _Cancelled):
            record.state = "interrupted" if self._shutting_down else "cancelled"
            record.error = "server shut down; start the job again to resume" if self._shutting_down else None
        except Exception as error:  # the job's outcome, reported in its record; never kills the server
            logger.exception("%s failed", record.id)
            record.state = "failed"
            record.error = f"{type(error).__name__}: {error}"
        finally:
            record.finished = _now()
            final = self._snapshot(job)
            with job.write_lock:
                self._write(final)
            with self._guard:
                self._running.pop(record.id, None)
            with contextlib.suppress(FileNotFoundError):
                (self.jobs_dir / f"{record.id}.cancel").unlink()
            self._unlock(job.lock_descriptor)
            logger.info("%s ended %s", record.id, record.state)

    def _tick(self, job: _Running) -> None:
        """Called from job threads: flush progress and pick up a cross-process cancel, once a second."""
        now = time.monotonic()
        if now - job.last_flush < FLUSH_SECONDS:
            return
        job.last_flush = now
        if (self.jobs_dir / f"{job.record.id}.cancel").exists():
            job.record.cancel_requested = True
            job.cancel.set()
        if job.write_lock.acquire(blocking=False):
            try:
                self._write(self._snapshot(job))
            finally:
                job.write_lock.release()

    def _run_ingest(self, job: _Running) -> dict[str, Any]:
        raw = self.catalog.raw_dir(job.record.entity)
        if raw is None:
            raise FileNotFoundError(f"{job.record.entity}: raw folder disappeared from the data root")
        options = job.record.options
        manifest = ingest(
            raw,
            self.settings.shard_root,
            workers=options.get("workers") or self.settings.ingest_workers,
            shard_size=options.get("shard_size") or self.settings.shard_size,
            progress=job.ingest,
            cancel=job.cancel,
            on_sample=lambda: self._tick(job),
        )
        return {
            "manifest_state": manifest.state,
            "num_shards": len(manifest.shards),
            "num_samples": manifest.num_samples,
            "num_excluded": len(manifest.excluded),
        }

    def _run_verify(self, job: _Running) -> dict[str, Any]:
        folder = self.settings.shard_root / job.record.entity
        manifest = load_manifest(folder)
        job.verify_bytes_total = sum(entry.bytes for entry in manifest.files().values())

        def progress(num_bytes: int) -> None:
            job.verify_bytes_done += num_bytes
            self._tick(job)
            if job.cancel.is_set():
                raise _Cancelled()

        report = verify_folder(folder, progress=progress)
        if job.cancel.is_set():
            raise _Cancelled()
        result: dict[str, Any] = {
            "job": job.record.id,
            "finished": _now(),
            "checked": {name: entry.sha256 for name, entry in manifest.files().items()},
            "problems": {problem.name: dataclasses.asdict(problem) for problem in report.problems},
        }
        for problem in result["problems"].values():
            problem["sha256"] = result["checked"].get(problem["name"])
        self.verify_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.verify_dir / f"{job.record.entity}.json", json.dumps(result).encode())
        return {"ok": report.ok, "num_files": report.num_files, "num_problems": len(report.problems)}

    def _snapshot(self, job: _Running) -> JobRecord:
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

    # Files and locks ----------------------------------------------------------------------
    def _try_lock(self, entity: str) -> int | None:
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.locks_dir / f"{entity}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        return descriptor

    @staticmethod
    def _unlock(descriptor: int) -> None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)

    def _settle_orphan(self, record: JobRecord) -> JobRecord:
        """A record says running: if no process holds its entity's lock, it was interrupted."""
        descriptor = self._try_lock(record.entity)
        if descriptor is None:
            return record
        try:
            # Re-read under the lock: the runner writes its final state before it unlocks.
            current = self._read(record.id) or record
            if current.state in ACTIVE:
                current.state = "interrupted"
                current.finished = current.finished or _now()
                current.error = "the server stopped while this job ran; start it again to resume"
                self._write(current)
            return current
        finally:
            self._unlock(descriptor)

    def _write(self, record: JobRecord) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.jobs_dir / f"{record.id}.json", json.dumps(dataclasses.asdict(record)).encode())

    def _read(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.from_dict(json.loads((self.jobs_dir / f"{job_id}.json").read_bytes()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def _records(self) -> list[JobRecord]:
        try:
            names = os.listdir(self.jobs_dir)
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            stem = name[: -len(".json")]
            if name.endswith(".json") and JOB_ID_RE.match(stem):
                record = self._read(stem)
                if record is not None:
                    records.append(record)
        return records
