"""Errors of the release downloader: each names the file, tar or key at fault and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.download.report import DownloadReport


class ConfigError(ValueError):
    """The download config is not valid: the message names the key, what was expected and the fix.

    Attributes:
        key: the config key at fault (``entity``, ``image``, ..., ``expression``), or None when the
            config as a whole is wrong (not an object, selects nothing, unreadable file).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ReleaseFormatError(ValueError):
    """The release's ``index.html`` or ``CHECKSUM`` cannot be trusted; raised before anything is written.

    Attributes:
        source: URL or name of the file that was read.
        line: 1-based line number, or None when the error is not tied to a line.
    """

    def __init__(self, source: str, message: str, line: int | None = None):
        self.source = source
        self.line = line
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"{where}: {message}")


class TarError(RuntimeError):
    """One release tar could not be used; the message starts with the tar's name.

    Attributes:
        tar: the tar's file name in the release, e.g. ``images--E057_Cheeks_Puffed.tar``.
    """

    def __init__(self, tar: str, message: str):
        self.tar = tar
        super().__init__(f"{tar}: {message}")


class FetchError(TarError):
    """A file could not be downloaded after all retries, or the server refused it (e.g. 404)."""


class ChecksumMismatch(TarError):
    """A downloaded tar's md5 differs from its ``CHECKSUM`` line; the tar is never extracted."""


class HostileTarError(TarError):
    """A tar holds a member that could write outside the entity folder, or a non-regular file.

    Attributes:
        member: the offending member name as stored in the tar.
    """

    def __init__(self, tar: str, member: str, reason: str):
        self.member = member
        super().__init__(
            tar, f"member {member!r} {reason}; the whole tar is rejected and nothing was extracted"
        )


class DownloadFailed(RuntimeError):
    """Some selected tars were not extracted; ``report`` says which and why.

    Attributes:
        report: the :class:`~services.download.report.DownloadReport` of the run.
    """

    def __init__(self, report: DownloadReport, failed: list[tuple[str, str]]):
        self.report = report
        lines = "\n".join(f"  {name}: {error}" for name, error in failed)
        super().__init__(
            f"{len(failed)} release tar(s) failed and were not extracted:\n{lines}\n"
            "Rerun the same command to retry; verified and extracted tars are kept."
        )
