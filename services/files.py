"""Serving a published file: one open descriptor, conditional requests, one byte range, chunked reads.

Why not Starlette's ``FileResponse``: it opens the file by path (twice: stat, then open), builds
its ETag from mtime and size, never answers 304 and would serve whatever is at that path. Here
the route hands over a descriptor that the catalog opened once (``O_NOFOLLOW``, size checked
against the manifest), and :class:`PublishedFileResponse`:

- answers 304 / 206 / 416 / 200 as :mod:`services.ranges` decides, ETag = quoted manifest sha256;
- sends with sendfile(2) when the server offers the ASGI zero-copy send extension
  (:class:`services.server.ZeroCopyProtocol`; the bytes never enter Python, a slow reader holds
  no memory), else reads ``chunk_bytes`` at a time with ``os.pread`` in a worker thread
  (bounded by a limiter of its own, so slow clients cannot take the threads that other routes
  need), the next chunk only after the previous one was handed to the socket, so a slow reader
  holds one chunk;
- watches ``receive`` for ``http.disconnect`` and stops reading within one chunk when the
  client goes away;
- gives up on a client that accepts nothing for ``send_timeout`` seconds;
- if the file shrinks while it is served (truncated in place), it stops and leaves the response
  short: the server closes the connection and the client sees fewer bytes than Content-Length.
  It never pads, and never sends bytes past the length it announced. A file replaced by rename
  keeps being served from the old inode, so the client gets the old bytes whole.
"""

from __future__ import annotations

import io
import logging
import os
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.metrics import Metrics
from services.ranges import ByteRange, none_match, parse_range, strong_etag
from services.server import ZERO_COPY_SEND

logger = logging.getLogger("services.files")

READ_LIMITER_TOKENS = 16
ZERO_COPY_PIECE_BYTES = 16 << 20
"""Bytes per zero-copy send: costs no memory; only sets how often the byte counters move."""
MEDIA_TYPES = {"shard": "application/x-tar", "meta": "application/octet-stream"}


NGINX_INTERNAL_LOCATION = """\
location {prefix} {{
    internal;
    alias {shard_root}/;
    disable_symlinks on;
    sendfile on;
    etag off;
    add_header ETag $upstream_http_etag;
    add_header Last-Modified "";
    if_modified_since off;
    max_ranges 1;
}}
"""
"""The nginx location that ``Settings.accel_redirect_prefix`` points at (``prefix``, ``shard_root``).

The app has already answered 304, 404, 409 and 416 and chosen 200 or 206; this location makes
nginx reach the same answer from the same request headers: the app's ETag (the manifest
sha256) is the one If-Range is compared with, no Last-Modified (an If-Range date means the
whole file, as in :mod:`services.ranges`), and several ranges mean the whole file.
"""


class _ClientGone(Exception):
    """The zero-copy send found the client gone (it raises, where plain ``send`` does nothing)."""


class PublishedFileResponse(Response):
    """An ASGI response that owns ``descriptor`` and closes it when done (or when never sent)."""

    def __init__(
        self,
        descriptor: int,
        *,
        status_code: int,
        headers: dict[str, str],
        byte_range: ByteRange | None,
        size: int,
        send_body: bool,
        kind: str,
        name: str,
        metrics: Metrics,
        chunk_bytes: int,
        send_timeout: float,
        limiter: anyio.CapacityLimiter,
    ):
        self.descriptor: int | None = descriptor
        self.file: io.FileIO | None = None  # over ``descriptor``, for sendfile
        self.status_code = status_code
        self.background = None
        self.start, self.length = (byte_range.start, byte_range.length) if byte_range else (0, size)
        if not send_body:
            self.length = 0 if status_code == 304 else self.length
        self.send_body = send_body
        self.kind = kind
        self.name = name
        self.metrics = metrics
        self.chunk_bytes = chunk_bytes
        self.send_timeout = send_timeout
        self.limiter = limiter
        self.init_headers(headers)
        if status_code != 304:
            self.raw_headers.append((b"content-length", str(self.length).encode()))
        metrics.open_streams.inc()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()  # closefd=False: the descriptor is closed below
            self.file = None
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None
            self.metrics.open_streams.dec()

    def __del__(self) -> None:
        # A response the framework built but never sent (an error after the route returned).
        self.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            if not self.send_body or self.length == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async with anyio.create_task_group() as group:
                group.start_soon(self._cancel_on_disconnect, receive, group.cancel_scope)
                await self._stream(send, zero_copy=ZERO_COPY_SEND in scope.get("extensions", {}))
                group.cancel_scope.cancel()
        finally:
            self.close()

    async def _cancel_on_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _stream(self, send: Send, zero_copy: bool) -> None:
        # With zero copy the server measures stalls on progress (TimeoutError); otherwise a
        # piece the client does not take within send_timeout is a stall.
        send_piece = self._send_file_piece if zero_copy else self._read_and_send_piece
        piece_bytes = ZERO_COPY_PIECE_BYTES if zero_copy else self.chunk_bytes
        served = self.metrics.bytes_served.labels(self.kind)
        offset, end = self.start, self.start + self.length
        try:
            # One scope whose deadline moves with each piece: cheaper than a new one per piece.
            with anyio.CancelScope() as stall:
                while offset < end:
                    want = min(piece_bytes, end - offset)
                    if not zero_copy:
                        stall.deadline = anyio.current_time() + self.send_timeout
                    if not await send_piece(send, offset, want, offset + want < end):
                        # Truncated in place while serving: end short, the server closes the connection.
                        self.metrics.errors.labels("file_shrank_while_serving").inc()
                        logger.warning(
                            "%s shrank while being served (below %d bytes, at offset %d); response cut",
                            self.name,
                            offset + want,
                            offset,
                        )
                        return
                    offset += want
                    served.inc(want)
        except _ClientGone:
            self.metrics.errors.labels("client_disconnected").inc()
        except TimeoutError:
            self._count_send_timeout()
        except anyio.get_cancelled_exc_class():
            self.metrics.errors.labels("client_disconnected").inc()
            raise
        if stall.cancelled_caught:
            self._count_send_timeout()

    def _count_send_timeout(self) -> None:
        self.metrics.errors.labels("client_send_timeout").inc()
        logger.info("%s: client accepted nothing for %.0f s; response cut", self.name, self.send_timeout)

    async def _read_and_send_piece(self, send: Send, offset: int, want: int, more_body: bool) -> bool:
        """Read ``want`` bytes at ``offset`` in a worker thread and send them; False if the file is short."""
        assert self.descriptor is not None
        chunk = await anyio.to_thread.run_sync(os.pread, self.descriptor, want, offset, limiter=self.limiter)
        self.metrics.disk_bytes_read.inc(len(chunk))
        if len(chunk) != want:
            return False
        await send({"type": "http.response.body", "body": chunk, "more_body": more_body})
        return True

    async def _send_file_piece(self, send: Send, offset: int, want: int, more_body: bool) -> bool:
        """Send ``want`` bytes at ``offset`` with sendfile; False if the file is short.

        sendfile stops early at the end of a truncated file and the server then closes the
        connection; the size is checked before and after, so that the truncation is reported.
        """
        assert self.descriptor is not None
        if os.fstat(self.descriptor).st_size < offset + want:
            return False
        if self.file is None:
            self.file = io.FileIO(self.descriptor, "rb", closefd=False)
        try:
            await send(
                {
                    "type": ZERO_COPY_SEND,
                    "file": self.file,
                    "offset": offset,
                    "count": want,
                    "more_body": more_body,
                }
            )
        except TimeoutError:  # an OSError too, but the client is still there
            raise
        except OSError as error:
            raise _ClientGone from error
        self.metrics.disk_bytes_read.inc(want)
        return os.fstat(self.descriptor).st_size >= offset + want


def published_file_response(runtime, request: Request, entity: str, name: str, kind: str) -> Response:
    """The response for GET or HEAD of a published file ``name`` (a manifest name) of ``entity``.

    Raises:
        NotPublished: not in the manifest, missing, or not a regular file (404).
        FileMismatch: its size on disk differs from the manifest (409).
        RangeNotSatisfiable: 416.
    """
    entry = runtime.catalog.published_entry(entity, name)
    etag = strong_etag(entry.sha256)
    headers = {"etag": etag, "accept-ranges": "bytes", "cache-control": "no-cache"}
    descriptor = runtime.catalog.open_published(entity, entry)
    try:
        byte_range = None
        if none_match(request.headers.get("if-none-match"), etag):
            status = 304
        else:
            byte_range = parse_range(
                request.headers.get("range"), request.headers.get("if-range"), etag, entry.bytes
            )
            status = 206 if byte_range else 200
            headers["content-type"] = MEDIA_TYPES.get(kind, "application/octet-stream")
    except BaseException:
        os.close(descriptor)
        raise
    if byte_range is not None:
        headers["content-range"] = byte_range.content_range
    accel = runtime.settings.accel_redirect_prefix
    if accel is not None and request.method == "GET" and status != 304:
        # nginx sends the bytes from its internal location (NGINX_INTERNAL_LOCATION), which
        # applies the request's Range and If-Range to the same file and the same ETag.
        os.close(descriptor)
        del headers["accept-ranges"]  # nginx sends its own
        headers["x-accel-redirect"] = accel + quote(f"{entity}/{name}")
        runtime.metrics.bytes_served.labels(kind).inc(byte_range.length if byte_range else entry.bytes)
        return Response(status_code=status, headers=headers)
    return PublishedFileResponse(
        descriptor,
        status_code=status,
        headers=headers,
        byte_range=byte_range,
        size=entry.bytes,
        send_body=request.method != "HEAD" and status != 304,
        kind=kind,
        name=f"{entity}/{name}",
        metrics=runtime.metrics,
        chunk_bytes=runtime.settings.chunk_bytes,
        send_timeout=runtime.settings.send_timeout,
        limiter=runtime.read_limiter,
    )
