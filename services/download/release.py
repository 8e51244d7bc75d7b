"""One entity's release on the download server: its tars, their md5, and which ones a config selects.

The release (reference section 2.2) is a folder ``<root>/<ENTITY_ID>/`` whose ``index.html``
links ``CHECKSUM``, ``metadata.tar``, ``audio.tar`` and per expression ``images--<EXP>.tar`` (or
one per camera, ``images--<EXP>_cam<CAM>.tar``), ``unwrapped_uv_1024--<EXP>.tar`` (or per camera)
and ``tracked_mesh--<EXP>.tar``. ``CHECKSUM`` holds one ``<md5> <tar name>`` line per tar.

Both files are parsed in memory and checked in full before the downloader writes anything:
a malformed ``CHECKSUM`` line (bad md5, a path instead of a name, two md5 for one tar) rejects
the release. A linked tar with no ``CHECKSUM`` line is kept in the index but can never be used.

Selection differs from the seed on purpose: the seed keeps a tar when any configured expression
is a *substring* of its name, so ``metadata.tar`` and ``audio.tar`` are never fetched. Here an
expression selects a tar whose expression part equals it or extends it after ``_`` or ``-``:
``GAZ_G2_Wide_eyes`` selects ``unwrapped_uv_1024--GAZ_G2_Wide_eyes_Full-led_14.tar`` (as the
seed does) but ``E01`` selects nothing.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

from services.download.config import DownloadConfig
from services.download.errors import ReleaseFormatError

INDEX_NAME = "index.html"
CHECKSUM_NAME = "CHECKSUM"
METADATA_TAR = "metadata.tar"
AUDIO_TAR = "audio.tar"
ASSET_DIRS = {"images": "image", "unwrapped_uv_1024": "texture", "tracked_mesh": "mesh"}
"""Tar name prefix (also the folder inside the entity) -> config key that selects it."""

TAR_NAME_RE = re.compile(
    r"^(?P<prefix>images|unwrapped_uv_1024|tracked_mesh)--(?P<expression>[A-Za-z0-9][A-Za-z0-9_\-]*?)"
    r"(?:_cam(?P<camera>\d+))?\.tar$"
)
CHECKSUM_LINE_RE = re.compile(r"^(?P<md5>[0-9A-Fa-f]{32})\s+\*?(?P<name>\S+)$")
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ReleaseTar:
    """One tar of an entity's release.

    Attributes:
        name: file name, e.g. ``images--E057_Cheeks_Puffed_cam400002.tar``.
        url: absolute URL to download it from.
        md5: lower-case hex digest from ``CHECKSUM``, or None when ``CHECKSUM`` has no line for it.
        asset: config key that selects it (``image``, ``texture``, ``mesh``, ``metadata``, ``audio``),
            or None for a tar whose name this downloader does not know.
        expression: expression part of the name, or None for metadata and audio.
        camera: camera id of a per-camera tar, else None.
        selected: whether the config asks for it.
    """

    name: str
    url: str
    md5: str | None
    asset: str | None
    expression: str | None
    camera: str | None
    selected: bool


@dataclass(frozen=True)
class Release:
    """An entity's release as read from its ``index.html`` and ``CHECKSUM``.

    Attributes:
        entity_id: e.g. ``6795937``.
        index_url: URL of the ``index.html`` that was read.
        tars: every tar linked from ``index.html``, in link order.
        unmatched_expressions: configured expressions that select no tar of this entity.
    """

    entity_id: str
    index_url: str
    tars: tuple[ReleaseTar, ...]
    unmatched_expressions: tuple[str, ...]

    @property
    def selected(self) -> list[ReleaseTar]:
        return [tar for tar in self.tars if tar.selected]


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def entity_url(base_url: str, entity_id: str) -> str:
    """URL of an entity's release folder, with a trailing slash."""
    return urljoin(base_url if base_url.endswith("/") else base_url + "/", f"{entity_id}/")


def parse_index(html: str, index_url: str) -> dict[str, str]:
    """Map each linked file name to its absolute URL.

    Links are resolved against ``index_url`` (the real index links absolute S3 URLs; relative
    links work too). Links to folders, to the index itself and to files that are neither
    ``CHECKSUM`` nor ``*.tar`` are ignored.

    Raises:
        ReleaseFormatError: no link at all, or one name linked to two different URLs.
    """
    parser = _LinkParser()
    parser.feed(html)
    parser.close()
    links: dict[str, str] = {}
    for href in parser.hrefs:
        url = urljoin(index_url, href)
        name = unquote(posixpath.basename(urlsplit(url).path))
        if name != CHECKSUM_NAME and not name.endswith(".tar"):
            continue
        if not SAFE_NAME_RE.match(name):
            raise ReleaseFormatError(
                index_url, f"link {href!r} names {name!r}, which is not a plain file name"
            )
        if links.get(name, url) != url:
            raise ReleaseFormatError(index_url, f"{name} is linked twice, to {links[name]} and {url}")
        links[name] = url
    if not links:
        raise ReleaseFormatError(
            index_url,
            "links no CHECKSUM and no .tar; is --base-url the release root and the entity id right?",
        )
    return links


def parse_checksum(text: str, source: str) -> dict[str, str]:
    """Parse ``CHECKSUM``: one ``<md5> <tar name>`` per line (``md5sum`` output), blank lines allowed.

    Returns:
        tar name -> lower-case md5 hex digest.

    Raises:
        ReleaseFormatError: naming the line: not ``<32 hex digits> <name>``, a name with a folder
            or odd characters, one name with two different md5, or no line at all.
    """
    digests: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        match = CHECKSUM_LINE_RE.match(line)
        if match is None:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise ReleaseFormatError(
                source, f"expected '<32 hex digit md5> <tar name>', found {shown!r}", line=number
            )
        name, md5 = match["name"], match["md5"].lower()
        if not SAFE_NAME_RE.match(name):
            raise ReleaseFormatError(
                source, f"{name!r} is not a plain tar file name (no folders, no '..')", line=number
            )
        if digests.get(name, md5) != md5:
            raise ReleaseFormatError(
                source, f"{name} has two different md5: {digests[name]} and {md5}", line=number
            )
        digests[name] = md5
    if not digests:
        raise ReleaseFormatError(source, "has no '<md5> <tar name>' line; the release cannot be verified")
    return digests


def classify(name: str) -> tuple[str | None, str | None, str | None]:
    """Split a tar name into (config key, expression, camera); (None, None, None) if unknown."""
    if name == METADATA_TAR:
        return "metadata", None, None
    if name == AUDIO_TAR:
        return "audio", None, None
    match = TAR_NAME_RE.match(name)
    if match is None:
        return None, None, None
    return ASSET_DIRS[match["prefix"]], match["expression"], match["camera"]


def expression_selects(configured: str, expression: str) -> bool:
    """Whether a configured expression selects a tar's expression part (equal, or extended after _ or -)."""
    return expression == configured or (
        expression.startswith(configured) and expression[len(configured)] in "_-"
    )


def build_release(
    entity_id: str, index_url: str, links: dict[str, str], digests: dict[str, str], config: DownloadConfig
) -> Release:
    """Combine the parsed index and CHECKSUM into the entity's tar list, marking what ``config`` selects."""
    tars = []
    matched: set[str] = set()
    for name, url in links.items():
        if name == CHECKSUM_NAME:
            continue
        asset, expression, camera = classify(name)
        selected = False
        if asset is not None and getattr(config, asset):
            if expression is None:
                selected = True
            else:
                hits = [e for e in config.expressions if expression_selects(e, expression)]
                matched.update(hits)
                selected = bool(hits)
        tars.append(ReleaseTar(name, url, digests.get(name), asset, expression, camera, selected))
    per_expression = config.image or config.mesh or config.texture
    unmatched = tuple(e for e in config.expressions if per_expression and e not in matched)
    return Release(entity_id, index_url, tuple(tars), unmatched)
