"""HTTP downloads with resume, retries and an md5 computed on the way.

A tar is written to ``<name>.part`` beside a small ``<name>.part.json`` that remembers the URL
and the server's validator (strong ETag, else Last-Modified). When a ``.part`` exists, from a
dropped connection or a killed run, the request asks for the rest with ``Range: bytes=N-`` and
``If-Range: <validator>``: a 206 appends, a 200 (the file changed, or no range support) starts
over. Connection errors, stalls (no byte for ``stall_timeout`` seconds), truncated bodies and
408/429/5xx answers are retried with exponential backoff; the retry count starts again whenever
an attempt brought new bytes, so a long tar on a flaky link still finishes. Other HTTP errors
(404, 403) fail at once. The md5 is updated as bytes are written (file writes and hashing run
in threads), so a finished tar is not read again just to verify it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from services.download.errors import FetchError

CHUNK = 1 << 20
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE_RE = re.compile(r"^bytes (?:(?P<start>\d+)-(?P<end>\d+)|\*)/(?P<total>\d+|\*)$")

ByteReport = Callable[[int, int | None], None]
"""Called as ``report(bytes_on_disk, total_bytes_or_None)`` while a tar downloads."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try.

    Attributes:
        retries: attempts allowed after a failure that brought no new byte.
        backoff: seconds before the first retry; doubled for each further one.
        max_backoff: cap of the delay, in seconds.
        stall_timeout: seconds without a byte before an attempt is abandoned.
        connect_timeout: seconds to open a connection.
    """

    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    stall_timeout: float = 60.0
    connect_timeout: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff)


@dataclass(frozen=True)
class PartDownload:
    """A fully downloaded ``.part`` file, not yet compared with CHECKSUM.

    Attributes:
        path: the ``.part`` file.
        md5: hex digest of its bytes.
        size: its size in bytes.
        resumed: whether any bytes came from an earlier attempt or run (a Range request).
    """

    path: Path
    md5: str
    size: int
    resumed: bool


class _Retry(Exception):
    """An attempt failed in a way that a later attempt may not."""


@dataclass
class _PartState:
    """What is known of the ``.part`` across attempts: the md5 of its first ``hashed`` bytes."""

    digest: Any = field(default_factory=hashlib.md5)
    hashed: int = 0
    resumed: bool = False

    def restart(self) -> None:
        self.digest, self.hashed, self.resumed = hashlib.md5(), 0, False


def open_session(policy: RetryPolicy, connections: int) -> aiohttp.ClientSession:
    """A session that keeps bytes as sent (no transparent gzip) and abandons stalled reads."""
    timeout = aiohttp.ClientTimeout(
        total=None, connect=policy.connect_timeout, sock_read=policy.stall_timeout
    )
    connector = aiohttp.TCPConnector(limit=max(connections, 1))
    return aiohttp.ClientSession(
        timeout=timeout, connector=connector, auto_decompress=False, headers={"Accept-Encoding": "identity"}
    )


async def _retrying(name: str, url: str, policy: RetryPolicy, attempt_once: Callable) -> object:
    """Await ``attempt_once(progress)`` until it succeeds or the retries run out.

    An attempt sets ``progress[0] = True`` once it has written new bytes; the count of failures
    then starts again, so only failures in a row without progress use up ``policy.retries``.
    """
    failures = 0
    while True:
        progress = [False]
        try:
            return await attempt_once(progress)
        except (TimeoutError, aiohttp.ClientError, _Retry) as error:
            failures = 1 if progress[0] else failures + 1
            if failures > policy.retries:
                reason = str(error) or type(error).__name__
                raise FetchError(name, f"gave up on {url} after {policy.retries} retries: {reason}") from None
            await asyncio.sleep(policy.delay(failures))


async def fetch_text(session: aiohttp.ClientSession, url: str, name: str, policy: RetryPolicy) -> str:
    """GET a small text file (``index.html``, ``CHECKSUM``) into memory, with retries."""

    async def attempt(_progress: list[bool]) -> str:
        async with session.get(url) as response:
            _check_status(response, name, url)
            body = await response.read()
        return body.decode("utf-8", errors="replace")

    return await _retrying(name, url, policy, attempt)  # type: ignore[return-value]


def _check_status(response: aiohttp.ClientResponse, name: str, url: str) -> None:
    if response.status in RETRYABLE_STATUS:
        raise _Retry(f"HTTP {response.status}")
    if response.status not in (200, 206):
        raise FetchError(name, f"HTTP {response.status} {response.reason} from {url}")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of a Content-Range header; None for parts that are absent or ``*``."""
    match = _CONTENT_RANGE_RE.match(value or "")
    if match is None:
        return None, None
    start = int(match["start"]) if match["start"] is not None else None
    total = int(match["total"]) if match["total"] != "*" else None
    return start, total


def _validator(response: aiohttp.ClientResponse) -> str | None:
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _read_part_meta(meta: Path, url: str) -> str | None:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("validator") if data.get("url") == url else None


def _hash_file(path: Path) -> Any:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    return _hash_file(path).hexdigest()


def _write_chunk(handle: Any, digest: Any, chunk: bytes) -> None:
    handle.write(chunk)
    digest.update(chunk)


async def download_part(
    session: aiohttp.ClientSession,
    name: str,
    url: str,
    folder: Path,
    policy: RetryPolicy,
    report: ByteReport | None = None,
) -> PartDownload:
    """Download ``url`` into ``folder/<name>.part``, resuming what is there.

    Args:
        session: from :func:`open_session`.
        name: the tar's release name (file name and error messages).
        url: where to get it.
        folder: where ``<name>.part`` and ``<name>.part.json`` live.
        policy: retries and timeouts.
        report: progress callback, see :data:`ByteReport`.

    Raises:
        FetchError: the server refused the file, or the retries ran out.
    """
    part = folder / f"{name}.part"
    meta = folder / f"{name}.part.json"
    state = _PartState()

    async def attempt(progress: list[bool]) -> PartDownload:
        offset = part.stat().st_size if part.exists() else 0
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = _read_part_meta(meta, url)
            if validator:
                headers["If-Range"] = validator
        async with session.get(url, headers=headers) as response:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if response.status == 416 and offset:
                if total == offset:  # the earlier run got every byte but stopped before renaming
                    return await _finish(offset, resumed=True)
                await _truncate()
                raise _Retry(f"{part.name} is longer than the file on the server; starting over")
            _check_status(response, name, url)
            if response.status == 206 and offset and start == offset:
                mode, state.resumed = "ab", True
            elif response.status == 206:
                await _truncate()
                raise _Retry(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            else:
                offset, mode = 0, "wb"
                state.restart()
                meta.write_text(json.dumps({"url": url, "validator": _validator(response)}), encoding="utf-8")
            if total is None and response.content_length is not None:
                total = offset + response.content_length
            if state.hashed != offset:  # a .part left by an earlier run: hash what is there
                state.digest = await asyncio.to_thread(_hash_file, part)
                state.hashed = offset
            if report:
                report(offset, total)
            size = offset
            buffer = bytearray()
            with open(part, mode) as handle:

                async def flush() -> None:
                    nonlocal size
                    data = bytes(buffer)
                    buffer.clear()
                    await asyncio.to_thread(_write_chunk, handle, state.digest, data)
                    size += len(data)
                    state.hashed = size
                    progress[0] = True
                    if report:
                        report(size, total)

                try:
                    async for chunk in response.content.iter_any():
                        buffer += chunk
                        if len(buffer) >= CHUNK:
                            await flush()
                finally:
                    if buffer:  # bytes received before a drop are good: keep them for the resume
                        await flush()
        if total is not None and size != total:
            raise _Retry(f"body ended at byte {size} of {total}")
        return await _finish(size, resumed=state.resumed)

    async def _truncate() -> None:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        state.restart()

    async def _finish(size: int, resumed: bool) -> PartDownload:
        if state.hashed != size:
            state.digest = await asyncio.to_thread(_hash_file, part)
        return PartDownload(part, state.digest.hexdigest(), size, resumed)

    return await _retrying(name, url, policy, attempt)  # type: ignore[return-value]


def discard_part(folder: Path, name: str) -> None:
    """Remove a ``.part`` and its sidecar (after an md5 mismatch, so the next try starts clean)."""
    for path in (folder / f"{name}.part", folder / f"{name}.part.json"):
        path.unlink(missing_ok=True)


def publish_part(part: PartDownload, final: Path) -> None:
    """Give a verified ``.part`` its final name and drop its sidecar."""
    os.replace(part.path, final)
    Path(f"{part.path}.json").unlink(missing_ok=True)
