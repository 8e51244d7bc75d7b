"""Ingest, verify and download jobs: start (202, or 409 while one runs on the entity), progress, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from services import models
from services.auth import require_admin, require_read
from services.errors import error_responses
from services.jobs import JobRecord
from services.runtime import RuntimeDep

router = APIRouter(prefix="/api/v1", tags=["jobs"])


def _job(record: JobRecord) -> models.Job:
    return models.Job(**record.__dict__, url=f"/api/v1/jobs/{record.id}")


def _accepted(record: JobRecord, response: Response) -> models.Job:
    response.headers["Location"] = f"/api/v1/jobs/{record.id}"
    return _job(record)


@router.post(
    "/entities/{entity}/ingest",
    status_code=202,
    response_model=models.Job,
    dependencies=[Depends(require_admin)],
    responses=error_responses(400, 401, 404, 409, 507),
)
def start_ingest(
    entity: str, runtime: RuntimeDep, response: Response, body: models.IngestRequest | None = None
) -> models.Job:
    """Start ingesting the entity's raw folder; resumes what an earlier (interrupted) ingest published."""
    options = body.model_dump(exclude_none=True) if body else {}
    return _accepted(runtime.jobs.start("ingest", entity, options), response)


@router.post(
    "/entities/{entity}/verify",
    status_code=202,
    response_model=models.Job,
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 404, 409, 507),
)
def start_verify(entity: str, runtime: RuntimeDep, response: Response) -> models.Job:
    """Re-hash every published file against the manifest; sets the entity's ``verified`` state."""
    return _accepted(runtime.jobs.start("verify", entity), response)


@router.post(
    "/downloads",
    status_code=202,
    response_model=models.Job,
    dependencies=[Depends(require_admin)],
    responses=error_responses(400, 401, 409, 507),
)
def start_download(body: models.DownloadRequest, runtime: RuntimeDep, response: Response) -> models.Job:
    """Download, md5-check and safely extract the release tars the config selects into the data root.

    The body is the reference's download config (422 naming the key when it is malformed or
    selects nothing). The release root is the server's setting ``MULTIFACE_DOWNLOAD_BASE_URL``
    (409 while it is unset); the data root must be writable (409 naming it). 409 too while a
    download of one of the entities, or a job on its folder, runs. Poll the job for tars and
    bytes done, rate, ETA and failed tars; a tar failing its md5 fails the job naming it.
    Starting the same download again resumes partial tars and skips extracted ones.
    """
    return _accepted(runtime.jobs.start_download(body.model_dump()), response)


@router.get(
    "/jobs",
    response_model=models.JobList,
    dependencies=[Depends(require_read)],
    responses=error_responses(401),
)
def list_jobs(
    runtime: RuntimeDep,
    entity: str | None = Query(None, max_length=300, description="only this entity's jobs"),
    limit: int = Query(100, ge=1, le=1000),
) -> models.JobList:
    """Jobs, newest first."""
    return models.JobList(jobs=[_job(record) for record in runtime.jobs.find(entity, limit)])


@router.get(
    "/jobs/{job_id}",
    response_model=models.Job,
    dependencies=[Depends(require_read)],
    responses=error_responses(401, 404),
)
def get_job(job_id: str, runtime: RuntimeDep) -> models.Job:
    """A job's state and progress: samples or tars, bytes, rate, ETA, excluded samples or failed tars."""
    return _job(runtime.jobs.get(job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=models.Job,
    status_code=202,
    dependencies=[Depends(require_admin)],
    responses={
        200: {"model": models.Job, "description": "the job had already ended"},
        **error_responses(401, 404),
    },
)
def cancel_job(job_id: str, runtime: RuntimeDep, response: Response) -> models.Job:
    """Ask a running job to stop at its next sample (202); an ended job is returned as it is (200)."""
    record = runtime.jobs.cancel(job_id)
    if record.state != "running":
        response.status_code = 200
    return _job(record)
