"""Domain errors of the data service and the one place that maps them to HTTP.

Routes and the modules behind them raise these; :func:`install_error_handlers` turns each into
a JSON body ``{"detail": ..., "error": <class name>}`` with its status. A request the service
cannot answer is refused with a 4xx that says why; the one 5xx is 507 Insufficient Storage, when
the disk the service must write to (a job record, a download) is full: the request was fine,
and it will succeed once space is freed.
"""

from __future__ import annotations

import errno
import logging
import os
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.download.errors import ConfigError

logger = logging.getLogger("services.errors")


class ServiceError(Exception):
    """Base of the errors a route may raise; ``status`` is the HTTP status it maps to."""

    status = 400
    headers: dict[str, str] = {}

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class EntityNotFound(ServiceError):
    """No entity of that name under the data root or the shard root."""

    status = 404


class NotPublished(ServiceError):
    """The name is not in the entity's published manifest (or there is no manifest yet)."""

    status = 404


class JobNotFound(ServiceError):
    status = 404


class JobConflict(ServiceError):
    """A job already runs on that entity."""

    status = 409

    def __init__(self, detail: str, running_job: str | None = None):
        super().__init__(detail)
        self.running_job = running_job


class InsufficientStorage(ServiceError):
    """The disk the service must write to is full (ENOSPC) or over quota (EDQUOT)."""

    status = 507


class NotWritable(ServiceError):
    """A folder the service must write to refuses it (read-only mount, permissions).

    409: the request is fine, the server's folders are in a state that conflicts with it.
    """

    status = 409


def storage_error(error: OSError, folder: Path, action: str, retry: str) -> ServiceError:
    """The refusal for an ``OSError`` raised while the service wrote under ``folder``.

    Args:
        error: what the write raised.
        folder: the folder written to; named in the message.
        action: what was being done, e.g. ``"cannot start the job: writing its record"``.
        retry: what to do once the folder is fixed, e.g. ``"start the job again"``.

    Returns:
        :class:`InsufficientStorage` (507) for a full disk or quota, else :class:`NotWritable` (409).
    """
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(
            f"{action} in {folder} failed: {reason}; free space on that disk, then {retry}"
        )
    return NotWritable(
        f"{action} in {folder} failed: {reason}; make it writable for the service (uid {os.getuid()}), "
        f"then {retry}"
    )


class FileMismatch(ServiceError):
    """A published file on disk does not match its manifest entry (size); it is refused, not served.

    409 rather than a 5xx: the request was fine, the shard root is in a state that conflicts
    with its own manifest (truncated by hand, replaced outside ingest). Run a verify job or
    re-ingest; the trainer's client treats it as an integrity failure, not a retryable outage.
    """

    status = 409


class RangeNotSatisfiable(ServiceError):
    status = 416

    def __init__(self, detail: str, size: int):
        super().__init__(detail)
        self.headers = {"Content-Range": f"bytes */{size}"}


class Unauthorized(ServiceError):
    status = 401

    def __init__(self, detail: str, error: str = "invalid_token"):
        super().__init__(detail)
        self.headers = {"WWW-Authenticate": f'Bearer realm="multiface", error="{error}"'}


class ErrorBody(BaseModel):
    """Body of every error response."""

    detail: str
    error: str


def install_error_handlers(app: FastAPI) -> None:
    """Map every :class:`ServiceError` to its status with an :class:`ErrorBody`."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServiceError)
        if error.status == 409 and isinstance(error, FileMismatch):
            logger.warning("refused %s: %s", request.url.path, error.detail)
        return JSONResponse(
            {"detail": error.detail, "error": type(error).__name__},
            status_code=error.status,
            headers=error.headers,
        )

    async def handle_http(request: Request, error: Exception) -> JSONResponse:
        # Starlette's own errors (404 no route, 405 with Allow, 400 unparseable body) get the same body.
        assert isinstance(error, StarletteHTTPException)
        return JSONResponse(
            {"detail": str(error.detail), "error": HTTPStatus(error.status_code).phrase.replace(" ", "")},
            status_code=error.status_code,
            headers=error.headers,
        )

    async def handle_config(request: Request, error: Exception) -> JSONResponse:
        # A download config that is well formed but says nothing sensible (selects no tar): the
        # same 422 body as FastAPI's own validation errors, naming the key at fault.
        assert isinstance(error, ConfigError)
        location = ["body", error.key] if error.key else ["body"]
        return JSONResponse(
            {"detail": [{"type": "value_error", "loc": location, "msg": str(error)}]}, status_code=422
        )

    app.add_exception_handler(ServiceError, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(ConfigError, handle_config)


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses=`` entries for the error statuses a route can answer.

    The JSON schema is written inline with its media type, so that routes whose success is
    HTML or bytes still document their errors as ``application/json``.
    """
    schema = ErrorBody.model_json_schema()
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, "error"),
            "content": {"application/json": {"schema": schema}},
        }
        for status in statuses
    }


_DESCRIPTIONS = {
    400: "malformed request body",
    401: "missing, malformed or wrong Bearer token",
    404: "unknown entity, job or unpublished file",
    409: "a job runs on the entity, the file on disk does not match the manifest, "
    "or a folder the job writes to is not writable",
    416: "range not satisfiable (see Content-Range)",
    507: "the disk the service writes job records or downloads to is full; free space and retry",
}
