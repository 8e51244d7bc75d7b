"""Running the app under uvicorn, with a header timeout uvicorn itself lacks.

uvicorn closes a keep-alive connection after ``timeout_keep_alive`` only once a response has
been sent, and restarts that timer whenever a byte arrives: a client that opens a connection
and trickles header bytes (or sends nothing) is never closed. :class:`HeaderTimeoutProtocol`
arms a deadline when a connection opens and after each response; if the request's headers are
not complete by then, it closes the connection. ``limit_concurrency`` stays unset on purpose:
with it, idle slow-header connections count against the limit and normal requests get 503.

A slow *body* (request bodies here are small JSON) and a slow *reader* are not covered here:
a download that accepts no bytes for ``send_timeout`` is cut by :mod:`services.files`.
On SIGTERM uvicorn stops accepting, lets running responses finish for up to
``graceful_shutdown_timeout`` seconds, then cuts them; clients resume with Range.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors.multiprocess import Multiprocess

from services.settings import Settings

logger = logging.getLogger("services.server")

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
        http=HeaderTimeoutProtocol,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  # any number works
        timeout_graceful_shutdown=settings.graceful_shutdown_timeout,  # type: ignore[arg-type]
        server_header=False,
        proxy_headers=False,
        **overrides,
    )
    install_access_log_filter()
    # Read by HeaderTimeoutProtocol; a plain attribute so it survives pickling to worker processes.
    config.multiface_header_timeout = settings.header_timeout  # type: ignore[attr-defined]
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
