"""Running the app under uvicorn, with a header timeout uvicorn itself lacks.

uvicorn closes a keep-alive connection after ``timeout_keep_alive`` only once a response has
been sent, and restarts that timer whenever a byte arrives: a client that opens a connection
and trickles header bytes (or sends nothing) is never closed. :class:`HeaderTimeoutProtocol`
arms a deadline when a connection opens and after each response; if the request's headers are
not complete by then, it closes the connection. ``limit_concurrency`` stays unset on purpose:
with it, idle slow-header connections count against the limit and normal requests get 503.

A slow *body* (request bodies here are small JSON) and a slow *reader* are not covered here:
a download that accepts no bytes for ``send_timeout`` is cut by :mod:`services.files` (by
:class:`ZeroCopyProtocol`, measured on the socket's progress, when it sends with sendfile).
On SIGTERM uvicorn stops accepting, lets running responses finish for up to
``graceful_shutdown_timeout`` seconds, then cuts them; clients resume with Range.

uvicorn has no sendfile either: every body byte is copied from the page cache into the app and
from the app into the socket. :class:`ZeroCopyProtocol` (``Settings.zero_copy``, on by default)
offers the app the ASGI zero-copy send extension and answers it with ``os.sendfile`` in worker
threads, while the event loop only waits for the socket to take more (so it stays free for
status requests: bench/results_serve.md). h11's data passthrough keeps uvicorn's
Content-Length bookkeeping exact.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import weakref

import anyio
import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors.multiprocess import Multiprocess

from services.settings import Settings

logger = logging.getLogger("services.server")

ZERO_COPY_SEND = "http.response.zerocopysend"
"""The ASGI "Zero Copy Send" extension; :class:`ZeroCopyProtocol` puts it in ``scope["extensions"]``."""

_closed_for_headers = 0
_counter_lock = threading.Lock()


def header_timeouts() -> int:
    """Connections this process closed because their headers did not arrive in time."""
    return _closed_for_headers


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for complete request headers."""

    def __init__(self, config: uvicorn.Config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.header_timeout: float = getattr(config, "multiface_header_timeout", 10.0)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._expire, self.cycle)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self, armed_cycle) -> None:
        global _closed_for_headers
        self._header_deadline = None
        # A new request cycle since arming means its headers arrived in time; a cycle still
        # sending its response (pipelining) is not idle either.
        waiting = self.cycle is armed_cycle and (armed_cycle is None or armed_cycle.response_complete)
        if waiting and not self.transport.is_closing():
            with _counter_lock:
                _closed_for_headers += 1
            self.transport.close()


class _FileSlice:
    """A body piece h11 only counts (its length); the bytes go out with sendfile."""

    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length


class ZeroCopyProtocol(HeaderTimeoutProtocol):
    """:class:`HeaderTimeoutProtocol` plus the ASGI zero-copy send extension.

    The app sends ``{"type": "http.response.zerocopysend", "file": <binary file object>,
    "offset": int, "count": int, "more_body": bool}`` after ``http.response.start``. The bytes
    go from the page cache to the socket without passing through Python; the system calls run
    in worker threads (at most ``SEND_THREADS``), so slow readers cannot hold threads, and a
    client that takes nothing for ``send_timeout`` seconds raises TimeoutError (a stall
    measured on progress, whatever the piece size). Unlike plain ``send``
    (a no-op once the client is gone), this raises ``OSError`` when the client has gone, so the
    app stops at once. If the file yields fewer than ``count`` bytes (truncated meanwhile), the
    connection is closed: the client sees fewer bytes than Content-Length, never padding.
    """

    def __init__(self, config: uvicorn.Config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.app = self._offer_zero_copy(self.app)

    def _offer_zero_copy(self, app):
        async def app_with_zero_copy(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            cycle = self.cycle  # this request's; uvicorn reads no further request until it is done
            scope.setdefault("extensions", {})[ZERO_COPY_SEND] = {}

            async def send_or_sendfile(message) -> None:
                if message["type"] == ZERO_COPY_SEND:
                    await self._send_file(cycle, message)
                else:
                    await send(message)

            return await app(scope, receive, send_or_sendfile)

        return app_with_zero_copy

    async def _send_file(self, cycle, message) -> None:
        if cycle.disconnected:
            raise ConnectionResetError("the client has gone")
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError(f"{ZERO_COPY_SEND} is only allowed inside a response body")
        file = message["file"]
        offset = message.get("offset")
        offset = file.tell() if offset is None else offset
        count = message.get("count")
        count = os.fstat(file.fileno()).st_size - offset if count is None else count
        if count > 0 and cycle.scope["method"] != "HEAD":
            # h11 counts the piece against Content-Length and gives back its framing around it;
            # any sized object passes through (h11's documented sendfile support).
            pieces = self.conn.send_with_data_passthrough(h11.Data(data=_FileSlice(count)))  # type: ignore[arg-type]
            sent = 0
            try:
                for piece in pieces or []:
                    if isinstance(piece, _FileSlice):
                        sent = await self._sendfile(file, offset, count)
                    else:
                        self.transport.write(piece)
            except BaseException:
                # Client gone (EPIPE, ECONNRESET), or cancelled mid-piece (send timeout): the
                # body can no longer match Content-Length.
                cycle.disconnected = True
                self.transport.close()
                raise
            if sent < count:
                cycle.disconnected = True
                self.transport.close()
                return
        if not message.get("more_body", False):
            await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _sendfile(self, file, offset: int, count: int) -> int:
        """Bytes of ``file`` sent; fewer than ``count`` only if the file ends early.

        The system calls run in worker threads, so the event loop stays free for other requests;
        a thread gives the socket back to the loop when it stays full for ``SEND_LINGER``
        seconds, so slow readers cannot hold threads. Raises TimeoutError when the client takes
        nothing for ``send_timeout`` seconds.
        """
        send_timeout = getattr(self.config, "multiface_send_timeout", 60.0)
        deadline = self.loop.time() + send_timeout
        while self.transport.get_write_buffer_size():  # bytes queued before this piece (headers)
            if self.loop.time() > deadline:
                raise TimeoutError(f"the client took nothing for {send_timeout:.0f} s")
            await asyncio.sleep(0.005)
        # A descriptor of our own: should the transport close its own meanwhile, the number
        # cannot be reused for another connection while a thread still writes to it.
        socket_fd = os.dup(self.transport.get_extra_info("socket").fileno())
        try:
            sent = 0
            while sent < count:
                more, at_end = await anyio.to_thread.run_sync(
                    _send_until_full,
                    socket_fd,
                    file.fileno(),
                    offset + sent,
                    count - sent,
                    limiter=_send_limiter(),
                )
                sent += more
                if at_end:
                    break
                if sent < count and not await self._writable(socket_fd, send_timeout):
                    raise TimeoutError(f"the client took nothing for {send_timeout:.0f} s")
            return sent
        finally:
            os.close(socket_fd)

    async def _writable(self, socket_fd: int, timeout: float) -> bool:
        """Wait until the socket takes more bytes; False once the client took none for ``timeout`` s.

        A slow reader can take bytes for a long time before the socket counts as writable
        again (it wants a third of its buffer free), so progress is read from the kernel's send
        queue, which shrinks with every byte the client acknowledges.
        """
        ready = self.loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_writer(socket_fd, wake)
        try:
            queued, progressed = _send_queue_bytes(socket_fd), self.loop.time()
            while True:
                await asyncio.wait([ready], timeout=min(1.0, timeout / 4))
                if ready.done():
                    return True
                now_queued = _send_queue_bytes(socket_fd)
                if now_queued is not None and queued is not None and now_queued < queued:
                    progressed = self.loop.time()
                queued = now_queued
                if self.loop.time() - progressed >= timeout:
                    return False
        finally:
            self.loop.remove_writer(socket_fd)


def _send_queue_bytes(socket_fd: int) -> int | None:
    """Bytes in the socket's send queue not yet acknowledged by the client (Linux), else None."""
    try:
        return struct.unpack("i", fcntl.ioctl(socket_fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return None


SEND_THREADS = 2
"""sendfile threads per event loop. More push no more bytes here and contend with the loop and
the route threads for the CPU and the GIL: status p50/p99 under load rose with 4 and 16 threads
(bench/results_serve.md). Scale with ``--workers``."""
SEND_LINGER = 0.005
"""Seconds a thread waits for a full socket to take more before handing it back to the loop."""
_send_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _send_limiter() -> anyio.CapacityLimiter:
    """The event loop's limiter of sendfile threads (one loop per server, several in tests)."""
    loop = asyncio.get_running_loop()
    limiter = _send_limiters.get(loop)
    if limiter is None:
        limiter = _send_limiters[loop] = anyio.CapacityLimiter(SEND_THREADS)
    return limiter


def _send_until_full(socket_fd: int, file_fd: int, offset: int, count: int) -> tuple[int, bool]:
    """In a worker thread: sendfile until all is sent or the socket stays full for ``SEND_LINGER``.

    Returns (bytes sent, end of file reached).
    """
    sent = 0
    poller = None
    while sent < count:
        try:
            more = os.sendfile(socket_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(socket_fd, select.POLLOUT)
            if not poller.poll(SEND_LINGER * 1000):
                return sent, False
            continue
        if more == 0:
            return sent, True
        sent += more
    return sent, False


class DropQueryStrings(logging.Filter):
    """Access-log filter: log the path without its query string.

    No route takes a token in the query, but a client may still put one there
    (``?access_token=``); uvicorn would write it to the access log. Query strings here only
    page through lists, so nothing of value is lost.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query omitted]", *args[3:])
        return True


def install_access_log_filter() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, DropQueryStrings) for existing in access.filters):
        access.addFilter(DropQueryStrings())


def build_config(settings: Settings, app=None, **overrides) -> uvicorn.Config:
    """A uvicorn config for ``settings``; ``app`` defaults to the env factory (needed for workers > 1).

    ``overrides`` go to ``uvicorn.Config`` as they are (tests pass ``log_config=None``).
    """
    config = uvicorn.Config(
        app if app is not None else "services.app:create_app_from_env",
        factory=app is None,
        host=settings.host,
        port=settings.port,
        workers=settings.workers if app is None else None,
        http=ZeroCopyProtocol if settings.zero_copy else HeaderTimeoutProtocol,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  # any number works
        timeout_graceful_shutdown=settings.graceful_shutdown_timeout,  # type: ignore[arg-type]
        server_header=False,
        proxy_headers=False,
        **overrides,
    )
    install_access_log_filter()
    # Read by the protocols; plain attributes so they survive pickling to worker processes.
    config.multiface_header_timeout = settings.header_timeout  # type: ignore[attr-defined]
    config.multiface_send_timeout = settings.send_timeout  # type: ignore[attr-defined]
    return config


def export_settings(settings: Settings) -> None:
    """Put the settings in the environment, for uvicorn worker processes built by the env factory."""
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        secret = getattr(settings, name)
        text = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(value)
        os.environ[f"MULTIFACE_{name.upper()}"] = text


def run(settings: Settings) -> None:
    """Serve until SIGTERM / Ctrl-C."""
    export_settings(settings)
    config = build_config(settings)
    try:
        if settings.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
