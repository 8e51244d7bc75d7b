"""HTTP conditional and range request headers (RFC 9110), for serving published files.

Decisions, each a permitted reading of RFC 9110 chosen so a response is never larger than the
file and never mixes two versions of it:

- One byte range (``0-8``, ``990-``, ``-10``) is served as 206; a start at or past the end, a
  zero-length suffix (``-0``) or any range on an empty file is 416 with ``Content-Range: */size``.
- A malformed byte range (``5-2``, ``a-b``, ``bytes=``) is 416 as well: the client asked for
  something this file cannot satisfy, and a full 200 would hide the client's bug.
- Several ranges (``0-1,5-6``, or 100+ of them) are ignored and the whole file is sent as 200
  (section 14.2 lets a server ignore Range): no multipart/byteranges, so overlapping ranges
  cannot amplify a response beyond the file size.
- A unit other than ``bytes`` (``items=0-5``) is ignored (200), as section 14.2 requires.
- ``If-Range`` that is not the current strong ETag (a stale ETag, or a date: no Last-Modified
  is sent) turns the request into a full 200, so a resumed download never splices two versions.
- ``If-None-Match`` matching the ETag (weak comparison, or ``*``) is 304 and wins over Range.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import RangeNotSatisfiable


@dataclass(frozen=True)
class ByteRange:
    """Inclusive byte positions ``start`` .. ``end`` of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def strong_etag(sha256: str) -> str:
    """The ETag of a published file: its manifest sha256, quoted (a strong validator)."""
    return f'"{sha256}"'


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` matches ``etag`` (weak comparison): then the answer is 304."""
    if if_none_match is None:
        return False
    tags = [_opaque(tag) for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def parse_range(range_header: str | None, if_range: str | None, etag: str, size: int) -> ByteRange | None:
    """The single byte range to serve, or None for the whole file (see the module docstring).

    Raises:
        RangeNotSatisfiable: the range is malformed or starts past the end of the file.
    """
    if range_header is None:
        return None
    if if_range is not None and if_range.strip() != etag:
        return None
    unit, _, spec = range_header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not _digits(first, allow_empty=True) or not _digits(last, allow_empty=True):
        raise RangeNotSatisfiable(f"malformed Range {range_header[:80]!r}; expected 'bytes=START-END'", size)
    if not first:
        if not last or int(last) == 0 or size == 0:
            raise RangeNotSatisfiable(
                f"Range {range_header[:80]!r} selects no bytes of a {size}-byte file", size
            )
        return ByteRange(max(0, size - int(last)), size - 1, size)
    start = int(first)
    if last and int(last) < start:
        raise RangeNotSatisfiable(f"malformed Range {range_header[:80]!r}: last byte before first", size)
    if start >= size:
        raise RangeNotSatisfiable(
            f"Range {range_header[:80]!r} starts past the end of a {size}-byte file", size
        )
    end = min(int(last), size - 1) if last else size - 1
    return ByteRange(start, end, size)


def _digits(text: str, allow_empty: bool) -> bool:
    text = text.strip()
    # isdigit() accepts non-ASCII digits; a position is ASCII 0-9 only, and 20 digits is past any file.
    return (allow_empty and not text) or (text.isascii() and text.isdigit() and len(text) <= 20)
