"""The service's long-lived parts, built once per app and handed to routes as a dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from services.catalog import Catalog
from services.files import READ_LIMITER_TOKENS
from services.jobs import JobManager
from services.metrics import Metrics
from services.reports import Reports
from services.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    catalog: Catalog
    jobs: JobManager
    reports: Reports
    metrics: Metrics
    read_limiter: anyio.CapacityLimiter

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        catalog = Catalog(settings)
        jobs = JobManager(settings, catalog)
        return cls(
            settings=settings,
            catalog=catalog,
            jobs=jobs,
            reports=Reports(catalog, jobs),
            metrics=Metrics(),
            read_limiter=anyio.CapacityLimiter(READ_LIMITER_TOKENS),
        )


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
