"""Entities: their state, completeness and a summary across them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from services import models
from services.auth import require_read
from services.errors import error_responses
from services.runtime import RuntimeDep

router = APIRouter(prefix="/api/v1", tags=["entities"], dependencies=[Depends(require_read)])
AUTH = error_responses(401)


@router.get("/entities", response_model=models.EntityList, responses=AUTH)
def list_entities(runtime: RuntimeDep) -> models.EntityList:
    """Every entity under the data root or the shard root, with its raw, ingest and verify state."""
    return runtime.reports.entities()


@router.get("/summary", response_model=models.Summary, responses=AUTH)
def summary(runtime: RuntimeDep) -> models.Summary:
    """Totals across entities: states, published shards, bytes and samples, raw completeness."""
    return runtime.reports.summary()


@router.get("/entities/{entity}", response_model=models.EntityState, responses=error_responses(401, 404))
def get_entity(entity: str, runtime: RuntimeDep) -> models.EntityState:
    """One entity's state."""
    return runtime.reports.entity(entity)


@router.get(
    "/entities/{entity}/completeness", response_model=models.Completeness, responses=error_responses(401, 404)
)
def completeness(
    entity: str,
    runtime: RuntimeDep,
    offset: int = Query(0, ge=0, le=10**9, description="first missing item to list"),
    limit: int = Query(100, ge=0, le=1000, description="missing items to list"),
) -> models.Completeness:
    """Raw completeness (every item ``scan_entity`` reports, missing items paged), absent release tars,
    and the published shards with their on-disk and verified state."""
    return runtime.reports.completeness(entity, offset, limit)
