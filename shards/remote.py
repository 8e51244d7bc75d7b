"""Read published shards over HTTP from the data service, with the checks plain WebDataset lacks.

Standard library only (``http.client``), so trainers need nothing beyond ``shards``:

- :func:`open_manifest` fetches and parses an entity's ``manifest.json``;
- :func:`fetch_file` streams one file with a stall timeout (a read that waits longer than
  ``stall_timeout`` fails, well under NCCL's 10-minute watchdog), resumes after a dropped
  connection with ``Range: bytes=N-`` and ``If-Range: "<sha256>"``, and checks size and sha256
  against the manifest entry at the end, raising :class:`shards.errors.IntegrityError` naming the
  file on a mismatch;
- :func:`fetch_verified` returns a verified shard as a file object (spooled to disk past
  ``spool_bytes``), and :func:`verified_streams` is a WebDataset pipeline stage built on it::

      manifest = open_manifest(base + "manifest.json", token=token)
      pipeline = wds.DataPipeline(
          wds.SimpleShardList([base + shard.name for shard in manifest.shards]),
          verified_streams(base, manifest, token=token),
          wds.tarfile_to_samples(),
      )

  A shard is downloaded and verified whole before any of its samples is yielded, so a
  truncated or corrupt shard is refused instead of silently yielding part of its samples.

The token goes in an ``Authorization: Bearer`` header only; the trainer reads it from its
environment and passes it in.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urljoin, urlsplit

from shards.errors import IntegrityError
from shards.manifest import FileEntry, Manifest, parse_manifest

logger = logging.getLogger("shards.remote")

READ_BYTES = 1 << 20
DEFAULT_STALL_TIMEOUT = 30.0
DEFAULT_RETRIES = 5
DEFAULT_SPOOL_BYTES = 256 << 20
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class FetchError(OSError):
    """A file could not be fetched: the server refused it, or every retry failed."""


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{url!r} is not an http(s) URL; expected e.g. http://host:8000/api/v1/entities/<entity>/"
        )
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return kind(parts.hostname, parts.port, timeout=timeout), target


def _headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": "multiface-shards-remote/1", "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _refuse(url: str, status: int, response: http.client.HTTPResponse) -> FetchError:
    detail = response.read(2000).decode("utf-8", "replace").strip()
    hint = {401: " (pass the read token: token=os.environ[...])", 404: " (not published)"}.get(status, "")
    return FetchError(f"{url}: HTTP {status}{hint}: {detail[:300]}")


def open_manifest(url: str, token: str | None = None, timeout: float = DEFAULT_STALL_TIMEOUT) -> Manifest:
    """Fetch and parse a published ``manifest.json``.

    Args:
        url: e.g. ``http://host:8000/api/v1/entities/<entity>/manifest.json``.
        token: the read token, or None when the service has no auth.
        timeout: seconds for the connection and for each read.
    """
    connection, target = _connection(url, timeout)
    try:
        connection.request("GET", target, headers=_headers(token))
        response = connection.getresponse()
        if response.status != 200:
            raise _refuse(url, response.status, response)
        return parse_manifest(response.read(), url)
    finally:
        connection.close()


def file_url(base_url: str, name: str) -> str:
    """The URL of manifest name ``name`` under ``base_url`` (the folder of ``manifest.json``)."""
    if not base_url.endswith("/"):
        base_url += "/"
    return urljoin(base_url, quote(name))


class _Sink:
    """Where fetched bytes go: a seekable stream that can be rewound when a download restarts."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.origin = stream.tell() if stream.seekable() else None
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.digest.update(data)
        self.size += len(data)

    def restart(self, name: str) -> None:
        if self.size == 0:
            return
        if self.origin is None:
            raise IntegrityError(
                f"{name}: the server restarted the transfer and the output stream cannot seek back"
            )
        self.stream.seek(self.origin)
        self.stream.truncate()
        self.digest = hashlib.sha256()
        self.size = 0


def fetch_file(
    base_url: str,
    name: str,
    dest_or_stream: str | Path | IO[bytes],
    expected: FileEntry,
    token: str | None = None,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    on_retry: Callable[[str, Exception], None] | None = None,
) -> None:
    """Download manifest file ``name`` into a path or a binary stream, resuming and verifying it.

    Args:
        base_url: the entity's folder URL, e.g. ``http://host:8000/api/v1/entities/<entity>/``.
        name: the manifest name, e.g. ``shards/E057_Cheeks_Puffed-000000.tar``.
        dest_or_stream: a path (written as ``.<name>.part`` beside it, renamed when verified) or
            a writable binary stream (seekable, if a restart from byte 0 may be needed).
        expected: the file's manifest entry (size and sha256).
        token: the read token, or None.
        stall_timeout: seconds any connect or read may wait before the attempt fails.
        retries: attempts after a failure that made no progress; a dropped connection that
            delivered bytes resets the count, a stall (no byte for ``stall_timeout``) never does.
        on_retry: called with (url, error) before each retry (logging, counters).

    Raises:
        IntegrityError: the bytes do not match ``expected``, the server's copy changed (ETag
            differs from the manifest's sha256: reload the manifest), or the server refused its
            own copy as not matching its manifest (409).
        FetchError: the server refused the file (401, 404, ...) or all retries failed.
    """
    if isinstance(dest_or_stream, str | Path):
        dest = Path(dest_or_stream)
        part = dest.with_name(f".{dest.name}.part")
        try:
            with open(part, "wb") as handle:
                fetch_file(base_url, name, handle, expected, token, stall_timeout, retries, on_retry)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        return

    url = file_url(base_url, name)
    etag = f'"{expected.sha256}"'
    sink = _Sink(dest_or_stream)
    failures = 0
    while True:
        before = sink.size
        try:
            if _attempt(url, name, sink, expected, etag, token, stall_timeout):
                break
        except (OSError, http.client.HTTPException) as error:
            if isinstance(error, FetchError) and not getattr(error, "retryable", False):
                raise
            # Progress forgives a dropped connection, not a stall: a server that keeps stopping
            # (even after a few bytes each time) is given up on instead of trickled from forever.
            progressed = sink.size > before and not isinstance(error, TimeoutError)
            failures = 1 if progressed else failures + 1
            if failures > retries:
                raise FetchError(
                    f"{url}: gave up after {retries} retries without progress: {error}"
                ) from error
            if on_retry is not None:
                on_retry(url, error)
            logger.info("%s: %s; retrying from byte %d", url, error, sink.size)
            time.sleep(min(8.0, 0.25 * 2 ** (failures - 1)) * random.uniform(0.8, 1.2))
    if sink.size != expected.bytes or sink.digest.hexdigest() != expected.sha256:
        raise IntegrityError(
            f"{name}: got {sink.size} bytes with sha256 {sink.digest.hexdigest()}, "
            f"manifest says {expected.bytes} bytes with sha256 {expected.sha256}"
        )


def _attempt(
    url: str, name: str, sink: _Sink, expected: FileEntry, etag: str, token: str | None, stall_timeout: float
) -> bool:
    """One request from ``sink.size`` on; True when the whole file has arrived, else it raises."""
    if sink.size >= expected.bytes:
        return True
    headers = _headers(token)
    if sink.size:
        headers["Range"] = f"bytes={sink.size}-"
        headers["If-Range"] = etag
    connection, target = _connection(url, stall_timeout)
    try:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        status = response.status
        if status in _RETRY_STATUSES:
            error = _refuse(url, status, response)
            error.retryable = True  # type: ignore[attr-defined]
            raise error
        if status == 409:
            # The service refuses a file whose size on disk differs from its manifest: the copy
            # is corrupt, as a sha256 mismatch would show, so it is refused like one (callers
            # skip and report IntegrityError; any other refusal stops them).
            raise IntegrityError(f"{name}: {_refuse(url, status, response)}")
        if status not in (200, 206):
            raise _refuse(url, status, response)
        if response.getheader("ETag") != etag:
            raise IntegrityError(
                f"{name}: the server's copy changed (ETag {response.getheader('ETag')}, manifest sha256 "
                f"{expected.sha256}); reload the manifest"
            )
        if status == 200:
            sink.restart(name)
        elif not (response.getheader("Content-Range") or "").startswith(f"bytes {sink.size}-"):
            raise IntegrityError(
                f"{name}: asked for bytes {sink.size}-, got {response.getheader('Content-Range')}"
            )
        length = response.getheader("Content-Length")
        if length is not None and sink.size + int(length) != expected.bytes:
            raise IntegrityError(
                f"{name}: the server sends {length} bytes from {sink.size}, the manifest says {expected.bytes} in all"
            )
        # read1, not read: read(n) waits for all n bytes and loses those it got when the
        # connection stalls or resets, so a resume would restart from the last whole megabyte.
        while chunk := response.read1(READ_BYTES):
            if sink.size + len(chunk) > expected.bytes:
                raise IntegrityError(
                    f"{name}: the server sent more than the manifest's {expected.bytes} bytes"
                )
            sink.write(chunk)
        if sink.size != expected.bytes:
            # http.client returns b"" on a connection closed early; make it a retryable failure.
            raise http.client.IncompleteRead(b"", expected.bytes - sink.size)
        return True
    finally:
        connection.close()


def fetch_verified(
    base_url: str,
    entry: FileEntry,
    token: str | None = None,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    spool_bytes: int = DEFAULT_SPOOL_BYTES,
) -> IO[bytes]:
    """A verified copy of one published file, rewound; memory up to ``spool_bytes``, then a temp file."""
    spool = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
    try:
        fetch_file(base_url, entry.name, spool, entry, token, stall_timeout, retries)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def iter_verified(
    base_url: str, entries: Iterable[FileEntry], token: str | None = None, **options: Any
) -> Iterator[tuple[FileEntry, IO[bytes]]]:
    """Yield ``(entry, verified file)`` per entry, each closed when the next is requested."""
    for entry in entries:
        stream = fetch_verified(base_url, entry, token, **options)
        try:
            yield entry, stream
        finally:
            stream.close()


def verified_streams(
    base_url: str, manifest: Manifest, token: str | None = None, **options: Any
) -> Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """A WebDataset stage: ``{"url": ...}`` in, ``{"url": ..., "stream": <verified file>}`` out.

    Each URL must be ``base_url`` + a manifest name; any other URL is refused (nothing unverified
    is ever read).
    """
    files = manifest.files()
    if not base_url.endswith("/"):
        base_url += "/"

    def stage(source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in source:
            url = sample["url"]
            name = url[len(base_url) :] if url.startswith(base_url) else None
            entry = files.get(name) if name is not None else None
            if entry is None:
                raise IntegrityError(f"{url}: not a file of the manifest under {base_url}")
            stream = fetch_verified(base_url, entry, token, **options)
            try:
                yield {**sample, "stream": stream}
            finally:
                stream.close()

    return stage


def read_verified(base_url: str, entry: FileEntry, token: str | None = None, **options: Any) -> bytes:
    """The verified bytes of one published file (small files: metadata)."""
    buffer = io.BytesIO()
    fetch_file(base_url, entry.name, buffer, entry, token, **options)
    return buffer.getvalue()
