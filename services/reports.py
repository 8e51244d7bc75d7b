"""Entity state, completeness and the summary, assembled from the catalog and the job records.

Everything a report says about shards comes from the published manifest (never from a
directory listing), a ``stat`` of each listed file, and the last verify job: a shard being
written is not listed until it is whole, and a deleted or truncated shard is counted at once.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Any, cast

from services import models
from services.catalog import Catalog, PublishedManifest
from services.jobs import JobManager
from services.settings import RELEASE_INDEX_DIR, RELEASE_INDEX_NAME
from shards.completeness import CompletenessReport
from shards.layout import METADATA_FILES, entity_id_of

API = "/api/v1"
_RELEASE_FOLDERS = {
    "images": "images",
    "unwrapped_uv_1024": "unwrapped_uv_1024",
    "tracked_mesh": "tracked_mesh",
}


class Reports:
    def __init__(self, catalog: Catalog, jobs: JobManager):
        self.catalog = catalog
        self.jobs = jobs

    # One entity ---------------------------------------------------------------------------
    def entity(self, name: str) -> models.EntityState:
        name = self.catalog.require(name)
        published = self.catalog.manifest(name)
        manifest = published.manifest if published else None
        running = self.jobs.running_for(name)
        last_ingest = self.jobs.last(name, "ingest")
        state: models.IngestState
        if running is not None and running.kind == "ingest":
            state = "running"
        elif last_ingest is not None and last_ingest.state == "failed":
            state = "failed"
        elif manifest is not None:
            state = cast(models.IngestState, manifest.state)
        else:
            state = "none"
        return models.EntityState(
            name=name,
            entity_id=_entity_id(name),
            raw_present=self.catalog.raw_dir(name) is not None,
            ingest_state=state,
            manifest_state=cast(models.ManifestState, manifest.state) if manifest else None,
            num_shards_published=len(manifest.shards) if manifest else 0,
            num_shards_planned=manifest.num_planned_shards if manifest else 0,
            num_samples=manifest.num_samples if manifest else 0,
            num_excluded=len(manifest.excluded) if manifest else 0,
            verified=self._verified(name, published, running)[0],
            running_job=running.id if running else None,
            last_ingest_job=last_ingest.id if last_ingest else None,
            manifest_url=f"{API}/entities/{name}/manifest.json" if manifest else None,
        )

    def entities(self) -> models.EntityList:
        return models.EntityList(entities=[self.entity(name) for name in self.catalog.names()])

    def completeness(self, name: str, offset: int, limit: int) -> models.Completeness:
        name = self.catalog.require(name)
        report = self.catalog.scan(name)
        published = self.catalog.manifest(name)
        return models.Completeness(
            entity=name,
            entity_id=_entity_id(name),
            raw=_raw(report, offset, limit) if report else None,
            release=self._release(name, report),
            shards=self._shards(name, published) if published else None,
        )

    def summary(self) -> models.Summary:
        rows: list[models.SummaryRow] = []
        ingest_states: Counter[str] = Counter()
        verified_states: Counter[str] = Counter()
        num_shards = num_bytes = num_samples = num_raw = 0
        for name in self.catalog.names():
            state = self.entity(name)
            report = self.catalog.scan(name)
            published = self.catalog.manifest(name)
            if published:
                num_shards += len(published.manifest.shards)
                num_bytes += sum(entry.bytes for entry in published.manifest.files().values())
            num_samples += state.num_samples
            num_raw += state.raw_present
            ingest_states[state.ingest_state] += 1
            verified_states[state.verified.state] += 1
            rows.append(
                models.SummaryRow(
                    name=name,
                    ingest_state=state.ingest_state,
                    raw_percent=report.totals()["all"].percent if report else None,
                    raw_num_samples=report.num_samples if report else None,
                    num_samples_published=state.num_samples,
                    verified=state.verified.state,
                )
            )
        return models.Summary(
            num_entities=len(rows),
            num_raw=num_raw,
            ingest_states=dict(ingest_states),
            verified_states=dict(verified_states),
            num_shards_published=num_shards,
            num_samples_published=num_samples,
            bytes_published=num_bytes,
            entities=rows,
        )

    # Parts --------------------------------------------------------------------------------
    def _shard_states(self, name: str, published: PublishedManifest) -> dict[str, models.ShardState]:
        """State of every published file: on-disk size first, then the last verify's verdict."""
        verify = self.jobs.verify_result(name) or {}
        checked, problems = verify.get("checked", {}), verify.get("problems", {})
        folder = self.catalog.settings.shard_root / name
        states: dict[str, models.ShardState] = {}
        for entry in published.manifest.files().values():
            path = folder / entry.name
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                states[entry.name] = "missing"
                continue
            problem = problems.get(entry.name) or {}
            same_entry = problem.get("sha256") == entry.sha256
            if info.st_size != entry.bytes or not stat.S_ISREG(info.st_mode):
                states[entry.name] = "size"
            elif same_entry and problem.get("problem") == "sha256":
                states[entry.name] = "sha256"
            elif not problem and checked.get(entry.name) == entry.sha256:
                states[entry.name] = "ok"
            else:
                # Never checked, or checked as missing / wrong size and since then put back: unknown.
                states[entry.name] = "unverified"
        return states

    def _verified(
        self, name: str, published: PublishedManifest | None, running
    ) -> tuple[models.Verified, dict[str, models.ShardState]]:
        verify = self.jobs.verify_result(name)
        if running is not None and running.kind == "verify":
            return models.Verified(state="running", job=running.id), {}
        if published is None or verify is None:
            return models.Verified(state="never"), {}
        states = self._shard_states(name, published)
        counts = Counter(states.values())
        num_bad = len(states) - counts["ok"] - counts["unverified"]
        state: models.VerifyState = "failed" if num_bad else ("stale" if counts["unverified"] else "ok")
        verified = models.Verified(
            state=state,
            job=verify.get("job"),
            finished=verify.get("finished"),
            num_ok=counts["ok"],
            num_bad=num_bad,
            num_unverified=counts["unverified"],
        )
        return verified, states

    def _shards(self, name: str, published: PublishedManifest) -> models.ShardCompleteness:
        manifest = published.manifest
        verified, states = self._verified(name, published, self.jobs.running_for(name))
        states = states or self._shard_states(name, published)
        shards = [
            models.ShardStatus(
                name=entry.name,
                bytes=entry.bytes,
                sha256=entry.sha256,
                num_samples=entry.num_samples,
                state=states[entry.name],
            )
            for entry in sorted(manifest.shards, key=lambda entry: entry.name)
        ]
        counts = Counter(shard.state for shard in shards)
        return models.ShardCompleteness(
            manifest_state=cast(models.ManifestState, manifest.state),
            num_planned=manifest.num_planned_shards,
            num_published=len(shards),
            num_samples=manifest.num_samples,
            num_samples_servable=sum(
                shard.num_samples for shard in shards if shard.state in ("ok", "unverified")
            ),
            num_excluded=len(manifest.excluded),
            num_ok=counts["ok"],
            num_unverified=counts["unverified"],
            num_missing=counts["missing"],
            num_corrupt=counts["size"] + counts["sha256"],
            verified=verified,
            shards=shards,
        )

    def _release(self, name: str, report: CompletenessReport | None) -> models.ReleaseStatus | None:
        entity_id = _entity_id(name)
        if entity_id is None:
            return None
        path = self.catalog.settings.release_index(entity_id)
        shown = f"{RELEASE_INDEX_DIR}/{entity_id}/{RELEASE_INDEX_NAME}"
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            return models.ReleaseStatus(
                index=shown, num_tars=0, absent=[], unknown=[], error=f"unreadable: {error}"
            )
        names = _tar_names(body)
        if names is None:
            expected = 'expected a JSON list of tar names or {"tars": [name or {"name": ...}, ...]}'
            return models.ReleaseStatus(index=shown, num_tars=0, absent=[], unknown=[], error=expected)
        raw = self.catalog.raw_dir(name)
        absent, unknown = [], []
        for tar in names:
            folders = _tar_contents(tar)
            if folders is None:
                unknown.append(tar)
            elif raw is None or not all(_non_empty(raw / folder) for folder in folders):
                absent.append(tar)
        # The downloader's own records (services.download.index), when the index carries them.
        records = (
            [tar for tar in body.get("tars", []) if isinstance(tar, dict)] if isinstance(body, dict) else []
        )
        states = Counter(str(tar["state"]) for tar in records if "state" in tar)
        failed = [
            f"{tar['name']}: {tar.get('error') or 'failed'}"
            for tar in records
            if tar.get("state") == "failed"
        ]
        return models.ReleaseStatus(
            index=shown,
            num_tars=len(names),
            absent=absent,
            unknown=unknown,
            downloader_states=dict(states),
            failed=failed,
        )


def _entity_id(name: str) -> str | None:
    try:
        return entity_id_of(name)
    except ValueError:
        return None


def _raw(report: CompletenessReport, offset: int, limit: int) -> models.RawCompleteness:
    body = report.to_dict()
    expressions = [
        {
            **{key: expression[key] for key in ("expression", "in_frame_list", "num_frames", "num_samples")},
            "num_extra_files": expression["num_extra_files"],
            "percent": expression["percent"],
            "totals": expression["totals"],
            # Per-camera tallies without the missing frames: those are paged under "missing".
            "cameras": [
                {
                    "camera": camera["camera"],
                    "photo": _tally(camera["photo"]),
                    "texture": _tally(camera["texture"]),
                }
                for camera in expression["cameras"]
            ],
        }
        for expression in body["expressions"]
    ]
    items = report.missing_items(offset, limit)
    return models.RawCompleteness.model_validate(
        {
            **{key: body[key] for key in _RAW_KEYS},
            "expressions": expressions,
            "missing": {
                "total": len(report.missing),
                "offset": offset,
                "limit": limit,
                "items": [item.to_dict() for item in items],
            },
        }
    )


_RAW_KEYS = (
    "complete",
    "metadata",
    "frame_list_error",
    "cameras",
    "num_files",
    "num_samples",
    "num_extra_files",
    "num_missing",
    "totals",
)


def _tally(coverage: dict[str, Any]) -> dict[str, Any]:
    return {key: coverage[key] for key in ("num_expected", "num_present", "percent")}


def _tar_names(body: Any) -> list[str] | None:
    tars = body.get("tars") if isinstance(body, dict) else body
    if not isinstance(tars, list):
        return None
    names = [tar.get("name") if isinstance(tar, dict) else tar for tar in tars]
    return (
        [name for name in names if isinstance(name, str)]
        if all(isinstance(name, str) for name in names)
        else None
    )


def _tar_contents(tar: str) -> list[str] | None:
    """Folders (or files) of the raw entity a release tar fills, relative to the entity root."""
    if tar == "metadata.tar":
        return list(METADATA_FILES)
    if tar == "audio.tar":
        return ["audio"]
    prefix, separator, rest = tar.partition("--")
    if not separator or prefix not in _RELEASE_FOLDERS or not rest.endswith(".tar"):
        return None
    expression = rest[: -len(".tar")]
    if not expression or "/" in expression or "\\" in expression or expression.startswith("."):
        return None
    head, cam, camera = expression.rpartition("_cam")
    if cam and camera.isdigit() and prefix != "tracked_mesh":
        return [f"{prefix}/{head}/{camera}"]
    return [f"{prefix}/{expression}"]


def _non_empty(path: Path) -> bool:
    if path.is_file():
        return True
    try:
        with os.scandir(path) as entries:
            return any(True for _ in entries)
    except OSError:
        return False
