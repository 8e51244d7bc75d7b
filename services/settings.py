"""Settings of the data service, read from ``MULTIFACE_*`` environment variables and CLI flags.

``get_settings`` is the FastAPI dependency every route uses; tests override it with
``app.dependency_overrides[get_settings]`` or pass a ``Settings`` to ``create_app``.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.download import DEFAULT_WORKERS as DEFAULT_DOWNLOAD_WORKERS

logger = logging.getLogger("services.settings")

RELEASE_INDEX_DIR = ".release"
RELEASE_INDEX_NAME = "index.json"
SERVICE_DIR = ".service"
"""Folder under the shard root where the service keeps job records, locks and verify results."""


class Settings(BaseSettings):
    """Every knob of ``multiface serve``; each field is also ``MULTIFACE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MULTIFACE_", extra="ignore")

    data_root: Path = Field(description="downloaded entities, one folder per entity (read only)")
    shard_root: Path = Field(description="one folder per entity as written by shards.ingest")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    ingest_workers: int | None = Field(None, ge=1, le=256, description="shards an ingest job writes at once")
    shard_size: int = Field(1_000_000_000, ge=1, description="default target shard size of ingest jobs")
    read_token: SecretStr | None = Field(None, description="Bearer token for data and status reads")
    admin_token: SecretStr | None = Field(None, description="Bearer token for jobs (also allowed to read)")
    public_status_page: bool = Field(False, description="serve the HTML status page at / without a token")
    chunk_bytes: int = Field(
        1 << 20, ge=4096, le=64 << 20, description="bytes read from disk per send (with zero_copy off)"
    )
    zero_copy: bool = Field(
        True, description="send file bodies with sendfile(2) instead of reading them into the app"
    )
    accel_redirect_prefix: str | None = Field(
        None,
        pattern=r"^/(\S*/)?$",
        description="only behind nginx: answer file GETs with an X-Accel-Redirect to this internal "
        "location (e.g. /internal/), which serves the shard root; nginx then sends the bytes",
    )
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send complete headers")
    send_timeout: float = Field(
        60.0, gt=0, description="seconds a client may accept no bytes before its download is cut"
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="seconds an idle keep-alive connection stays open"
    )
    graceful_shutdown_timeout: float = Field(
        10.0, gt=0, description="seconds in-flight downloads get to finish on SIGTERM before they are cut"
    )
    scan_cache_seconds: float = Field(
        10.0, ge=0, description="how long a completeness scan of a raw entity is reused"
    )
    download_base_url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="release root of download jobs (one folder per entity id), e.g. the seed's S3 "
        "root; unset: POST /api/v1/downloads is refused (409). Never taken from a request",
    )
    download_workers: int = Field(
        DEFAULT_DOWNLOAD_WORKERS,
        ge=1,
        le=64,
        description="release tars a download job fetches (and extracts) at once",
    )

    @model_validator(mode="after")
    def _check_tokens(self) -> Settings:
        for name in ("read_token", "admin_token"):
            token = getattr(self, name)
            if token is not None and len(token.get_secret_value()) < 16:
                raise ValueError(
                    f"MULTIFACE_{name.upper()} is shorter than 16 characters; use a random token, "
                    "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.read_token is not None or self.admin_token is not None

    @property
    def service_dir(self) -> Path:
        return self.shard_root / SERVICE_DIR

    def release_index(self, entity_id: str) -> Path:
        """Where the downloader leaves an entity's release index (optional; see the README)."""
        return self.data_root / RELEASE_INDEX_DIR / entity_id / RELEASE_INDEX_NAME

    def warn_about_ineffective(self) -> None:
        """Log settings that silently do less than a reader would expect."""
        if self.read_token is not None and self.admin_token is None:
            logger.warning(
                "MULTIFACE_READ_TOKEN is set but MULTIFACE_ADMIN_TOKEN is not: job endpoints refuse every "
                "request; set MULTIFACE_ADMIN_TOKEN to start ingest and verify jobs over HTTP"
            )
        if self.public_status_page and not self.auth_enabled:
            logger.warning("MULTIFACE_PUBLIC_STATUS_PAGE has no effect: no token is set, everything is open")
        if self.zero_copy and self.chunk_bytes != Settings.model_fields["chunk_bytes"].default:
            logger.warning(
                "MULTIFACE_CHUNK_BYTES has no effect: file bodies go out with sendfile (MULTIFACE_ZERO_COPY)"
            )
        if self.accel_redirect_prefix is not None:
            logger.warning(
                "MULTIFACE_ACCEL_REDIRECT_PREFIX=%s: nginx sends file bodies, so MULTIFACE_ZERO_COPY, "
                "MULTIFACE_CHUNK_BYTES and MULTIFACE_SEND_TIMEOUT do not apply to them; clients must reach "
                "the service only through nginx (a direct GET gets an empty body)",
                self.accel_redirect_prefix,
            )
        if self.download_base_url is None and self.download_workers != DEFAULT_DOWNLOAD_WORKERS:
            logger.warning(
                "MULTIFACE_DOWNLOAD_WORKERS has no effect: download jobs are off; set "
                "MULTIFACE_DOWNLOAD_BASE_URL to the release root to turn them on"
            )
        if self.download_base_url is not None and not os.access(self.data_root, os.W_OK | os.X_OK):
            logger.warning(
                "MULTIFACE_DOWNLOAD_BASE_URL is set but the data root %s is not writable: download jobs "
                "will be refused until it is (mount it read-write for the service)",
                self.data_root,
            )
        if self.workers > 1:
            logger.warning(
                "--workers %d: /metrics reports the one worker process that answers the scrape", self.workers
            )


@lru_cache
def get_settings() -> Settings:
    """The process's settings from the environment (a FastAPI dependency)."""
    return Settings()  # type: ignore[call-arg]  # data_root and shard_root come from the environment
