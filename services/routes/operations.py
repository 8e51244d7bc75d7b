"""Health, readiness (open, for compose healthchecks) and Prometheus metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services import models
from services.auth import require_read
from services.errors import error_responses
from services.runtime import RuntimeDep

router = APIRouter()


@router.get("/api/v1/health", response_model=models.Health, tags=["operations"])
def health() -> models.Health:
    """Liveness: the process answers."""
    return models.Health()


@router.get(
    "/api/v1/ready",
    response_model=models.Readiness,
    tags=["operations"],
    responses={503: {"model": models.Readiness, "description": "a root is missing or unusable"}},
)
def ready(runtime: RuntimeDep) -> JSONResponse:
    """Readiness: the data root is readable and the shard root is writable."""
    settings = runtime.settings
    checks = {
        "data_root": "ok"
        if os.access(settings.data_root, os.R_OK | os.X_OK)
        else f"{settings.data_root} not readable",
        "shard_root": "ok"
        if os.access(settings.shard_root, os.R_OK | os.W_OK | os.X_OK)
        else f"{settings.shard_root} not writable",
    }
    body = models.Readiness(ready=all(value == "ok" for value in checks.values()), checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    tags=["operations"],
    dependencies=[Depends(require_read)],
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        **error_responses(401),
    },
)
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics of this process."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
