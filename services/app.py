"""The FastAPI app: wires settings, catalog, jobs, metrics, error handlers and routes.

``create_app(settings)`` builds one; tests pass their own ``Settings``. ``create_app_from_env``
is the factory uvicorn worker processes call (settings from ``MULTIFACE_*``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services import server
from services.errors import install_error_handlers
from services.jobs import KINDS, JobRecord
from services.metrics import MetricsMiddleware, counter, gauge
from services.routes import entities, files, jobs, operations, status_page
from services.runtime import Runtime
from services.settings import Settings, get_settings

API_VERSION = "1"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    runtime = Runtime.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.warn_about_ineffective()
        runtime.jobs.recover()
        yield
        runtime.jobs.shutdown(timeout=settings.graceful_shutdown_timeout)

    app = FastAPI(
        title="Multiface Stream data service",
        version=API_VERSION,
        description="Serves published Multiface shards over HTTP (Range, ETag), reports raw completeness "
        "and shard state, and runs ingest, verify and release download jobs. Auth: optional Bearer tokens.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    install_error_handlers(app)
    for module in (operations, entities, files, jobs, status_page):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    runtime.metrics.add_collector(lambda: _live_metrics(runtime))
    return app


def create_app_from_env() -> FastAPI:
    return create_app(get_settings())


def _live_metrics(runtime: Runtime):
    running: list[JobRecord] = runtime.jobs.live()
    ingests = [job for job in running if job.kind == "ingest"]
    downloads = [job for job in running if job.kind == "download"]
    yield gauge(
        "multiface_jobs_running",
        "Jobs this process runs, by kind",
        ["kind"],
        [([kind], sum(job.kind == kind for job in running)) for kind in KINDS],
    )
    for name, key, documentation in (
        ("multiface_ingest_samples_done", "samples_done", "Samples an ingest has handled"),
        ("multiface_ingest_samples_total", "samples_total", "Samples an ingest will handle"),
        ("multiface_ingest_bytes_done", "bytes_done", "Sample bytes an ingest has written"),
        ("multiface_ingest_excluded", "num_excluded", "Samples an ingest left out"),
    ):
        yield gauge(
            name,
            documentation,
            ["entity", "job"],
            [([job.entity, job.id], job.progress[key]) for job in ingests],
        )
    for name, key, documentation in (
        ("multiface_download_tars_done", "tars_done", "Selected release tars a download has extracted"),
        ("multiface_download_tars_total", "tars_total", "Release tars a download's config selects"),
        ("multiface_download_tars_failed", "tars_failed", "Release tars a download failed to extract"),
        ("multiface_download_bytes_done", "bytes_done", "Release tar bytes a download has on disk"),
    ):
        yield gauge(
            name,
            documentation,
            ["entity", "job"],
            [([job.entity, job.id], job.progress[key]) for job in downloads],
        )
    yield counter(
        "multiface_header_timeouts",
        "Connections closed for not sending complete headers in time",
        server.header_timeouts(),
    )
