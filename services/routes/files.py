"""The manifest, the metadata files and the shards of an entity: GET and HEAD, Range, ETag.

URLs mirror manifest names, so a trainer joins ``/api/v1/entities/<entity>/`` and a name from
the manifest (``shards/E057-000000.tar``, ``meta/KRT``). A name is looked up in the published
manifest, never joined to a folder; see :mod:`services.files` and :mod:`services.ranges`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from services.auth import require_read
from services.errors import error_responses
from services.files import published_file_response
from services.ranges import none_match, strong_etag
from services.runtime import RuntimeDep

router = APIRouter(prefix="/api/v1/entities/{entity}", tags=["files"], dependencies=[Depends(require_read)])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the whole file",
        "content": {"application/octet-stream": _BINARY, "application/x-tar": _BINARY},
    },
    206: {
        "description": "one byte range",
        "content": {"application/octet-stream": _BINARY, "application/x-tar": _BINARY},
    },
    304: {"description": "If-None-Match matched the ETag"},
    **error_responses(401, 404, 409, 416),
}
MANIFEST_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "manifest.json as published",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    304: {"description": "If-None-Match matched the ETag"},
    **error_responses(401, 404),
}


def get_manifest(entity: str, request: Request, runtime: RuntimeDep) -> Response:
    """The published ``manifest.json``, byte for byte; ETag = quoted sha256 of those bytes."""
    published = runtime.catalog.require_manifest(entity)
    etag = strong_etag(published.sha256)
    headers = {"etag": etag, "cache-control": "no-cache"}
    if none_match(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    if request.method == "GET":
        runtime.metrics.bytes_served.labels("manifest").inc(len(published.data))
    return Response(published.data, media_type="application/json", headers=headers)


def get_shard(entity: str, name: str, request: Request, runtime: RuntimeDep) -> Response:
    """A published shard: ``shards/<name>`` in the manifest."""
    return published_file_response(runtime, request, entity, f"shards/{name}", "shard")


def get_meta(entity: str, name: str, request: Request, runtime: RuntimeDep) -> Response:
    """A published metadata file: ``meta/<name>`` in the manifest."""
    return published_file_response(runtime, request, entity, f"meta/{name}", "meta")


# GET and HEAD are separate operations so that OpenAPI gets a unique operation id for each.
for _path, _endpoint, _responses in (
    ("/manifest.json", get_manifest, MANIFEST_RESPONSES),
    ("/shards/{name}", get_shard, FILE_RESPONSES),
    ("/meta/{name}", get_meta, FILE_RESPONSES),
):
    for _method in ("GET", "HEAD"):
        router.add_api_route(
            _path,
            _endpoint,
            methods=[_method],
            name=f"{_endpoint.__name__}_{_method.lower()}",
            response_class=Response,
            responses=_responses,
        )
