"""The Multiface release downloader: ``multiface download`` and the API the data service calls.

Usage::

    from services.download import download_release
    report = download_release("mini_download_config.json", "/data/multiface")
    # -> /data/multiface/m--20180227--0000--6795937--GHS/... and
    #    /data/multiface/.release/6795937/index.json (which tars are absent / extracted / failed)

Modules: :mod:`~services.download.config` (the seed's JSON config), :mod:`~services.download.release`
(index.html, CHECKSUM, selection), :mod:`~services.download.fetch` (HTTP with resume and retries),
:mod:`~services.download.extract` (safe untar), :mod:`~services.download.index` (index.json),
:mod:`~services.download.pipeline` (the run), :mod:`~services.download.report` (its outcome).
"""

from services.download.config import DownloadConfig, load_config
from services.download.errors import (
    ChecksumMismatch,
    ConfigError,
    DownloadFailed,
    FetchError,
    HostileTarError,
    ReleaseFormatError,
    TarError,
)
from services.download.fetch import RetryPolicy
from services.download.index import ReleaseIndex, TarRecord, index_path, load_index
from services.download.pipeline import (
    DEFAULT_BASE_URL,
    DEFAULT_WORKERS,
    download_release,
    download_release_async,
)
from services.download.report import DownloadReport, EntityReport

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_WORKERS",
    "ChecksumMismatch",
    "ConfigError",
    "DownloadConfig",
    "DownloadFailed",
    "DownloadReport",
    "EntityReport",
    "FetchError",
    "HostileTarError",
    "ReleaseFormatError",
    "ReleaseIndex",
    "RetryPolicy",
    "TarError",
    "TarRecord",
    "download_release",
    "download_release_async",
    "index_path",
    "load_config",
    "load_index",
]
