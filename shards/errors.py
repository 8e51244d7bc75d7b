"""Errors raised for bad input: each names the file, the line where known, what was expected."""

from __future__ import annotations


class FormatError(ValueError):
    """A Multiface file does not have the expected format.

    Attributes:
        source: the file (or member) name that was read.
        line: 1-based line number, or None when the error is not tied to a line.
        expected: what the reader expected to find there.
    """

    def __init__(self, source: str, expected: str, line: int | None = None, found: str | None = None):
        self.source = source
        self.line = line
        self.expected = expected
        where = f"{source}, line {line}" if line is not None else source
        message = f"{where}: expected {expected}"
        if found is not None:
            shown = found if len(found) <= 80 else found[:77] + "..."
            message += f", found {shown!r}"
        super().__init__(message)


class IntegrityError(RuntimeError):
    """A shard or metadata file does not match its manifest entry (size or sha256)."""
