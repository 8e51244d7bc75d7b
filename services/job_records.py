"""Job records and job locks on disk, under ``<shard root>/.service/``.

``jobs/<job id>.json`` is a job's :class:`JobRecord`, rewritten atomically (temp, fsync, rename).
``locks/<entity>.lock`` is held with ``flock`` by the thread that runs an ingest or verify job of
that entity folder; ``locks/download/<entity id>.lock`` by the thread that downloads that release
entity. A lock is released when its holder ends or its process dies, so a record still
``running`` whose locks are all free belongs to a process that died (see :mod:`services.jobs`).
``jobs/<job id>.cancel`` asks the process running that job to stop it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shards.layout import entity_id_of
from shards.manifest import write_atomic

KINDS = ("ingest", "verify", "download")
ACTIVE = ("running",)
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")
JOB_ID_RE = re.compile(r"^(ingest|verify|download)-\d{8}T\d{6}-[0-9a-f]{8}$")
DOWNLOAD_LOCKS = "download"
"""Sub-folder of ``locks/`` for download locks, keyed by release entity id (not by folder name)."""


@dataclasses.dataclass
class JobRecord:
    """What a job did and is doing; the JSON file and the API response carry the same fields.

    ``entity`` is the entity folder name of an ingest or verify job, and the release entity ids
    of a download job joined with commas (``options["config"]`` holds its download config).
    """

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

    @property
    def entity_ids(self) -> list[str]:
        """Release entity ids a download job fetches (empty for other kinds)."""
        if self.kind != "download":
            return []
        config = self.options.get("config") or {}
        return [str(entity_id) for entity_id in config.get("entity", [])]

    @property
    def lock_names(self) -> list[str]:
        """The locks (relative to ``locks/``) its runner holds while it runs."""
        if self.kind == "download":
            return [download_lock(entity_id) for entity_id in self.entity_ids]
        return [self.entity]

    def concerns(self, entity: str) -> bool:
        """Whether the job works on ``entity``: its folder name, or for a download its entity id."""
        if self.kind != "download":
            return self.entity == entity
        ids = self.entity_ids
        return entity in ids or entity_id_or_none(entity) in ids


def utc_now() -> str:
    """The time as records store it: ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def download_lock(entity_id: str) -> str:
    return f"{DOWNLOAD_LOCKS}/{entity_id}"


def entity_id_or_none(name: str) -> str | None:
    """The entity id of an entity folder name (``m--...--<ID>--GHS``), or None for other names."""
    try:
        return entity_id_of(name)
    except ValueError:
        return None


class JobFiles:
    """Reads and writes job records, cancel markers and locks under one ``.service`` folder."""

    def __init__(self, service_dir: Path):
        self.jobs_dir = service_dir / "jobs"
        self.locks_dir = service_dir / "locks"

    # Records ------------------------------------------------------------------------------
    def write(self, record: JobRecord) -> None:
        """Rewrite a record atomically; raises the ``OSError`` of a full or read-only disk."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.jobs_dir / f"{record.id}.json", json.dumps(dataclasses.asdict(record)).encode())

    def read(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.from_dict(json.loads((self.jobs_dir / f"{job_id}.json").read_bytes()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def records(self) -> list[JobRecord]:
        try:
            names = os.listdir(self.jobs_dir)
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            stem = name[: -len(".json")]
            if name.endswith(".json") and JOB_ID_RE.match(stem):
                record = self.read(stem)
                if record is not None:
                    records.append(record)
        return records

    def cancel_marker(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}.cancel"

    # Locks --------------------------------------------------------------------------------
    def try_lock(self, name: str) -> int | None:
        """Take ``locks/<name>.lock`` without waiting: its descriptor, or None when it is held."""
        path = self.locks_dir / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        return descriptor

    def try_lock_all(self, names: list[str]) -> list[int] | None:
        """Take every lock of ``names``, or none of them (None) when one is held."""
        taken: list[int] = []
        try:
            for name in names:
                descriptor = self.try_lock(name)
                if descriptor is None:
                    self.unlock_all(taken)
                    return None
                taken.append(descriptor)
        except BaseException:
            self.unlock_all(taken)
            raise
        return taken

    def is_held(self, name: str) -> bool:
        """Whether some thread or process holds ``locks/<name>.lock`` right now."""
        if not (self.locks_dir / f"{name}.lock").exists():
            return False
        descriptor = self.try_lock(name)
        if descriptor is None:
            return True
        self.unlock(descriptor)
        return False

    @staticmethod
    def unlock(descriptor: int) -> None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)

    def unlock_all(self, descriptors: list[int]) -> None:
        for descriptor in descriptors:
            self.unlock(descriptor)
