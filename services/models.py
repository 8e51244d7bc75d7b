"""Response and request bodies of the HTTP API (they are what ``/openapi.json`` documents)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_validator

from services.download.config import (
    ASSET_KEYS,
    ENTITY_ID_RE,
    EXAMPLE,
    PER_EXPRESSION_KEYS,
    RELEASE_EXPRESSION_RE,
)

IngestState = Literal["none", "running", "partial", "complete", "failed"]
ManifestState = Literal["partial", "complete"]
VerifyState = Literal["never", "running", "ok", "failed", "stale"]
JobState = Literal["running", "succeeded", "failed", "cancelled", "interrupted"]
JobKind = Literal["ingest", "verify", "download"]
ShardState = Literal["ok", "unverified", "missing", "size", "sha256"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str] = Field(description="per check: 'ok' or what is wrong")


class Verified(BaseModel):
    """Outcome of the last verify job, against the manifest as it is now."""

    state: VerifyState = Field(
        description="never, running, ok, failed (a file is bad) or stale (files not checked yet)"
    )
    job: str | None = None
    finished: str | None = None
    num_ok: int = 0
    num_bad: int = 0
    num_unverified: int = 0


class EntityState(BaseModel):
    name: str = Field(description="entity folder name, e.g. m--20180227--0000--6795937--GHS")
    entity_id: str | None
    raw_present: bool = Field(description="the raw folder is under the data root")
    ingest_state: IngestState
    manifest_state: ManifestState | None
    num_shards_published: int
    num_shards_planned: int
    num_samples: int = Field(description="samples in published shards")
    num_excluded: int = Field(description="samples the ingest left out (see the manifest or the job)")
    verified: Verified
    running_job: str | None
    last_ingest_job: str | None
    manifest_url: str | None


class EntityList(BaseModel):
    entities: list[EntityState]


class Tally(BaseModel):
    num_expected: int
    num_present: int
    percent: float | None = Field(description="floored to 0.01; null when nothing is expected")


class CameraTally(BaseModel):
    camera: str
    photo: Tally
    texture: Tally


class ExpressionCompleteness(BaseModel):
    expression: str
    in_frame_list: bool
    num_frames: int
    num_samples: int = Field(description="trainable samples by the reference rule")
    num_extra_files: int
    percent: float | None
    totals: dict[str, Tally] = Field(description="per asset kind, then 'all'")
    cameras: list[CameraTally]


class MetadataStatus(BaseModel):
    name: str
    present: bool
    parseable: bool
    error: str | None = None


class MissingItem(BaseModel):
    kind: str
    expression: str | None
    camera: str | None
    frame: str | None
    path: str = Field(description="relative to the entity folder")


class MissingPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[MissingItem]


class CameraInfo(BaseModel):
    source: str = Field(description="'KRT', or 'listing' when the KRT does not parse")
    names: list[str]
    not_in_krt: list[str]


class RawCompleteness(BaseModel):
    complete: bool
    metadata: list[MetadataStatus]
    frame_list_error: str | None
    cameras: CameraInfo
    num_files: int
    num_samples: int = Field(description="trainable samples by the reference rule")
    num_extra_files: int
    num_missing: int
    totals: dict[str, Tally]
    expressions: list[ExpressionCompleteness]
    missing: MissingPage


class ReleaseStatus(BaseModel):
    """Release tars from ``<data root>/.release/<entity id>/index.json``, checked against the raw folder."""

    index: str = Field(description="the index file read, relative to the data root")
    num_tars: int
    absent: list[str] = Field(description="tars whose files are not (all) in the raw folder")
    unknown: list[str] = Field(description="tar names this service cannot map to folders")
    downloader_states: dict[str, int] = Field(
        default_factory=dict,
        description="tars per state the downloader recorded (absent, extracted, failed, ...)",
    )
    failed: list[str] = Field(
        default_factory=list, description="'<tar>: <why>' for tars the downloader marked failed"
    )
    error: str | None = None


class ShardStatus(BaseModel):
    name: str
    bytes: int
    sha256: str
    num_samples: int
    state: ShardState = Field(
        description="ok (verified), unverified, missing, size (on disk) or sha256 (last verify)"
    )


class ShardCompleteness(BaseModel):
    manifest_state: ManifestState
    num_planned: int
    num_published: int
    num_samples: int
    num_samples_servable: int = Field(description="samples in shards not known to be missing or corrupt")
    num_excluded: int
    num_ok: int
    num_unverified: int
    num_missing: int
    num_corrupt: int
    verified: Verified
    shards: list[ShardStatus]


class Completeness(BaseModel):
    entity: str
    entity_id: str | None
    raw: RawCompleteness | None = Field(description="null when the raw folder is not under the data root")
    release: ReleaseStatus | None = Field(description="null when no release index is known")
    shards: ShardCompleteness | None = Field(description="null when nothing is published")


class SummaryRow(BaseModel):
    name: str
    ingest_state: IngestState
    raw_percent: float | None
    raw_num_samples: int | None
    num_samples_published: int
    verified: VerifyState


class Summary(BaseModel):
    num_entities: int
    num_raw: int
    ingest_states: dict[str, int]
    verified_states: dict[str, int]
    num_shards_published: int
    num_samples_published: int
    bytes_published: int
    entities: list[SummaryRow]


class ExcludedSample(BaseModel):
    key: str
    path: str
    reason: str


class FailedTar(BaseModel):
    entity_id: str
    name: str = Field(description="the release tar, e.g. images--E057_Cheeks_Puffed.tar")
    error: str = Field(description="why it was not extracted (md5 mismatch, HTTP error, unsafe member)")


class JobProgress(BaseModel):
    """Progress of a job; which fields are set depends on its kind (the others are null or empty)."""

    samples_done: int | None = None
    samples_total: int | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    bytes_per_second: float = 0.0
    eta_seconds: float | None = None
    shards_done: int | None = None
    shards_total: int | None = None
    shards_resumed: int | None = None
    num_excluded: int | None = None
    excluded: list[ExcludedSample] = Field(default_factory=list, description="the first 200 excluded samples")
    tars_done: int | None = Field(None, description="download: selected release tars extracted")
    tars_total: int | None = Field(None, description="download: release tars the config selects")
    tars_failed: int | None = Field(None, description="download: tars that failed (see failed)")
    failed: list[FailedTar] = Field(
        default_factory=list, description="download: the first 200 failed tars with the reason"
    )


class Job(BaseModel):
    id: str
    kind: JobKind
    entity: str = Field(
        description="the entity folder name; for a download job the release entity ids, comma-separated"
    )
    state: JobState
    created: str
    finished: str | None
    cancel_requested: bool
    error: str | None
    options: dict[str, Any]
    progress: JobProgress
    result: dict[str, Any] | None
    url: str


class JobList(BaseModel):
    jobs: list[Job]


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard_size: int | None = Field(
        None, ge=1, le=10**13, description="target bytes per shard (default: the server's)"
    )
    workers: int | None = Field(
        None, ge=1, le=256, description="shards written at once (default: the server's)"
    )

    @field_validator("shard_size", "workers", mode="before")
    @classmethod
    def _json_integer(cls, value: Any) -> Any:
        # JSON Schema integers: 1 and 1.0 yes; true and "1" no (pydantic's lax mode takes both).
        if isinstance(value, bool | str):
            raise ValueError("must be a JSON integer")
        return value


EntityId = Annotated[str, StringConstraints(pattern=ENTITY_ID_RE.pattern, max_length=64)]
ExpressionName = Annotated[str, StringConstraints(pattern=RELEASE_EXPRESSION_RE.pattern, max_length=200)]


class DownloadRequest(BaseModel):
    """A download config in the reference's ``download_config.json`` format; every key is required."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": json.loads(EXAMPLE),
            # What DownloadConfig checks beyond types, stated for clients (and fuzzers): at least
            # one asset is true, and the expression list is not empty when a per-expression one is.
            "allOf": [
                {"anyOf": [{"properties": {key: {"const": True}}} for key in ASSET_KEYS]},
                {
                    "anyOf": [
                        {"properties": {"expression": {"minItems": 1}}},
                        {"properties": {key: {"const": False} for key in PER_EXPRESSION_KEYS}},
                    ]
                },
            ],
        },
    )

    entity: list[EntityId] = Field(
        min_length=1, max_length=100, description='release entity ids, e.g. ["6795937"] (strings)'
    )
    image: StrictBool = Field(description="images--<EXP>[_cam<CAM>].tar of the listed expressions")
    mesh: StrictBool = Field(description="tracked_mesh--<EXP>.tar of the listed expressions")
    texture: StrictBool = Field(
        description="unwrapped_uv_1024--<EXP>[_cam<CAM>].tar of the listed expressions"
    )
    metadata: StrictBool = Field(description="metadata.tar: KRT, frame list, means and variances")
    audio: StrictBool = Field(description="audio.tar: the SEN_* sentences' wav files")
    expression: list[ExpressionName] = Field(
        max_length=1000,
        description='expressions, e.g. ["E057_Cheeks_Puffed"]; must not be empty when image, mesh or '
        "texture is true",
    )
