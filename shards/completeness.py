"""Completeness scan of a downloaded Multiface entity: what is on disk, what is missing.

The scan checks the metadata files (present and parseable), then, per expression, which of
the frames listed in ``frame_list.txt`` have their meshes, average texture, audio (``SEN_``
expressions only) and, per camera, their photo and per-view texture. It lists every missing
item, not only counts, and counts the trainable samples by the reference rule (reference
section 3). Files are found from one listing per folder (:func:`shards.samples.index_entity`),
never a stat per expected file, so a tree of a million files scans in seconds.

A broken entity is reported, never raised: a missing folder is missing items, an unparseable
file is an error message in the report. Only a path that is not a folder raises
(``FileNotFoundError``).

Run it as ``multiface status ENTITY_DIR``, or from Python::

    report = scan_entity(Path("m--20180227--0000--6795937--GHS"))
    print(format_report(report))
    json.dumps(report.to_dict())
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards import formats
from shards.layout import (
    AUDIO_DIR,
    AVERAGE_DIR,
    MESH_DIR,
    METADATA_FILES,
    PHOTO_DIR,
    TEXTURE_DIR,
    EntityLayout,
    entity_id_of,
    is_sentence,
)
from shards.samples import EntityIndex, index_entity

EXPRESSION_KINDS = ("mesh_bin", "mesh_obj", "transform", "average_texture", "audio")
"""Assets of an expression; all per listed frame except ``audio`` (one file, ``SEN_`` only)."""

CAMERA_KINDS = ("photo", "texture")
"""Assets of an expression per camera and listed frame."""

MISSING_KINDS = ("metadata", *EXPRESSION_KINDS, *CAMERA_KINDS)
"""Every ``kind`` a missing item can have."""

_PARSERS: dict[str, Callable[[bytes, str], object]] = {
    "KRT": lambda data, source: formats.parse_krt(data.decode(), source),
    "frame_list.txt": lambda data, source: formats.parse_frame_list(data.decode(), source),
    "tex_mean.png": formats.parse_png,
    "tex_var.txt": lambda data, source: formats.parse_scalar(data.decode(), source),
    "vert_mean.bin": formats.parse_vert_mean,
    "vert_var.txt": lambda data, source: formats.parse_scalar(data.decode(), source),
}
assert set(_PARSERS) == set(METADATA_FILES), "every metadata file needs a parser"


def _percent(num_present: int, num_expected: int) -> float | None:
    # Floored, not rounded, so that 100.0 always means complete (999 of 1000 is 99.9, never 100).
    return None if num_expected == 0 else (10_000 * num_present // num_expected) / 100


@dataclass(frozen=True)
class Tally:
    """How many of the expected files of one kind are on disk."""

    num_expected: int
    num_present: int

    @property
    def percent(self) -> float | None:
        """Share present, floored to 0.01 percent; None when nothing is expected."""
        return _percent(self.num_present, self.num_expected)

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.num_expected + other.num_expected, self.num_present + other.num_present)

    def to_dict(self) -> dict[str, Any]:
        return {"num_expected": self.num_expected, "num_present": self.num_present, "percent": self.percent}


@dataclass(frozen=True)
class Coverage(Tally):
    """A :class:`Tally` plus the listed frames whose file is missing, in frame-list order."""

    missing_frames: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "missing_frames": list(self.missing_frames)}


@dataclass(frozen=True)
class MetadataStatus:
    """One entity-level file: whether it is there and whether its parser accepts it."""

    name: str
    present: bool
    parseable: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class MissingItem:
    """One expected file that is not on disk; ``path`` is relative to the entity root."""

    kind: str
    expression: str | None
    camera: str | None
    frame: str | None
    path: str

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class CameraCoverage:
    """Photos and per-view textures of one camera for one expression's listed frames."""

    camera: str
    photo: Coverage
    texture: Coverage

    def to_dict(self) -> dict[str, Any]:
        return {"camera": self.camera, "photo": self.photo.to_dict(), "texture": self.texture.to_dict()}


@dataclass(frozen=True)
class ExpressionReport:
    """Completeness of one expression.

    Attributes:
        expression: the expression name.
        in_frame_list: False for an expression found on disk only (then nothing is expected).
        num_frames: distinct frames listed for it in ``frame_list.txt``.
        assets: coverage per kind of :data:`EXPRESSION_KINDS`; ``audio`` only for ``SEN_``.
        cameras: photo and texture coverage per camera, in the report's camera order.
        num_extra_files: files on disk for frames the frame list does not list.
        num_samples: trainable samples by the reference rule.
    """

    expression: str
    in_frame_list: bool
    num_frames: int
    assets: dict[str, Coverage]
    cameras: list[CameraCoverage]
    num_extra_files: int
    num_samples: int

    def totals(self) -> dict[str, Tally]:
        """Tally per asset kind (photos and textures summed over cameras), then ``"all"``."""
        tallies: dict[str, Tally] = dict(self.assets)
        for kind in CAMERA_KINDS:
            tallies[kind] = sum((getattr(camera, kind) for camera in self.cameras), Tally(0, 0))
        tallies["all"] = sum(tallies.values(), Tally(0, 0))
        return tallies

    def to_dict(self) -> dict[str, Any]:
        totals = self.totals()
        return {
            "expression": self.expression,
            "in_frame_list": self.in_frame_list,
            "num_frames": self.num_frames,
            "num_samples": self.num_samples,
            "num_extra_files": self.num_extra_files,
            "percent": totals["all"].percent,
            "totals": {kind: tally.to_dict() for kind, tally in totals.items()},
            "assets": {kind: coverage.to_dict() for kind, coverage in self.assets.items()},
            "cameras": [camera.to_dict() for camera in self.cameras],
        }


@dataclass
class CompletenessReport:
    """Result of :func:`scan_entity`.

    Attributes:
        root: absolute path of the entity folder.
        entity: the folder name; ``entity_id`` is parsed from it (None if it is not a Multiface name).
        metadata: one status per file of ``METADATA_FILES``, in that order.
        cameras: the cameras expected per expression: KRT order, or sorted from disk when the
            KRT does not parse (``camera_source`` says which).
        cameras_not_in_krt: camera folders on disk that the KRT does not list (sorted).
        expressions: frame-list expressions in first-listed order, then disk-only ones sorted.
        num_files: files seen in the image, texture, mesh and audio folders.
        num_samples: trainable samples by the reference rule with all KRT cameras; 0 when the
            KRT or the frame list does not parse, since the reference cannot train then.
        missing: every missing file, ordered as the report: metadata, then per expression its
            audio, meshes and average texture (each in frame-list order), then per camera its
            photos and textures.
    """

    root: str
    entity: str
    entity_id: str | None
    metadata: list[MetadataStatus]
    cameras: list[str]
    camera_source: str
    cameras_not_in_krt: list[str]
    expressions: list[ExpressionReport]
    num_files: int
    num_samples: int
    missing: list[MissingItem] = field(default_factory=list)

    @property
    def frame_list_error(self) -> str | None:
        status = next(status for status in self.metadata if status.name == "frame_list.txt")
        return status.error

    @property
    def num_extra_files(self) -> int:
        return sum(expression.num_extra_files for expression in self.expressions)

    def totals(self) -> dict[str, Tally]:
        """Tally per asset kind over all expressions, then ``"all"``."""
        tallies = {kind: Tally(0, 0) for kind in (*EXPRESSION_KINDS, *CAMERA_KINDS, "all")}
        for expression in self.expressions:
            for kind, tally in expression.totals().items():
                tallies[kind] = tallies[kind] + tally
        return tallies

    @property
    def complete(self) -> bool:
        """Every metadata file parses and no expected file is missing."""
        return not self.missing and all(status.parseable for status in self.metadata)

    def missing_items(self, offset: int = 0, limit: int | None = None) -> list[MissingItem]:
        """A page of :attr:`missing`; the order is stable, so offsets page through it."""
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
        return self.missing[offset : None if limit is None else offset + limit]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict whose key order is fixed."""
        return {
            "entity": self.entity,
            "entity_id": self.entity_id,
            "root": self.root,
            "complete": self.complete,
            "metadata": [status.to_dict() for status in self.metadata],
            "frame_list_error": self.frame_list_error,
            "cameras": {
                "source": self.camera_source,
                "names": list(self.cameras),
                "not_in_krt": list(self.cameras_not_in_krt),
            },
            "num_files": self.num_files,
            "num_samples": self.num_samples,
            "num_extra_files": self.num_extra_files,
            "num_missing": len(self.missing),
            "totals": {kind: tally.to_dict() for kind, tally in self.totals().items()},
            "expressions": [expression.to_dict() for expression in self.expressions],
            "missing": [item.to_dict() for item in self.missing],
        }


def _check_metadata(layout: EntityLayout, name: str) -> tuple[MetadataStatus, object]:
    """Read and parse one metadata file; returns its status and the parsed value (or None)."""
    try:
        data = layout.metadata(name).read_bytes()
    except FileNotFoundError:
        return MetadataStatus(name, present=False, parseable=False, error=f"{name}: missing"), None
    except OSError as error:
        return MetadataStatus(
            name, present=True, parseable=False, error=f"{name}: unreadable ({error})"
        ), None
    try:
        return MetadataStatus(name, present=True, parseable=True), _PARSERS[name](data, name)
    except Exception as error:  # any parser failure is a finding about the file, never a crash
        message = str(error) if isinstance(error, formats.FormatError) else f"{name}: {error!r}"
        return MetadataStatus(name, present=True, parseable=False, error=message), None


def _coverage(frames: list[str], present: set[str]) -> Coverage:
    if present.issuperset(frames):  # the common case, checked in C without a Python loop
        return Coverage(len(frames), len(frames))
    missing = tuple(frame for frame in frames if frame not in present)
    return Coverage(len(frames), len(frames) - len(missing), missing)


def _count_samples(frame_list: list[tuple[str, str]], cameras: list[str], index: EntityIndex) -> Counter[str]:
    """Trainable samples per expression: ``shards.samples.enumerate_samples``'s rule, counted.

    The rule is the reference's (a listed frame with its average texture, times the cameras with
    its per-view texture; a frame listed twice counts twice); a test pins equality with
    ``enumerate_samples``. On a million-file tree, building its 500k SampleKeys took 2.0 CPU
    seconds, most of the scan; these set intersections take about 0.1.
    """
    eligible: dict[str, Counter[str]] = {}
    for expression, frame in frame_list:
        if frame in index.averages.get(expression, ()):
            eligible.setdefault(expression, Counter())[frame] += 1
    counts: Counter[str] = Counter()
    for expression, frames in eligible.items():
        unique = set(frames)
        repeats = {frame: num - 1 for frame, num in frames.items() if num > 1}
        for camera in cameras:
            textures = index.textures.get((expression, camera), set())
            counts[expression] += len(textures & unique)
            counts[expression] += sum(num for frame, num in repeats.items() if frame in textures)
    return counts


def _frames_by_expression(frame_list: list[tuple[str, str]]) -> dict[str, list[str]]:
    frames: dict[str, dict[str, None]] = {}
    for expression, frame in frame_list:
        frames.setdefault(expression, {})[frame] = None
    return {expression: list(listed) for expression, listed in frames.items()}


def _num_extra_files(present: set[str], listed: set[str], num_listed_present: int | None = None) -> int:
    # For an expected folder the coverage already counted the listed frames present; only a
    # folder outside the expected cameras needs the intersection.
    if num_listed_present is None:
        num_listed_present = len(present & listed)
    return len(present) - num_listed_present


def _scan_expression(
    expression: str,
    frames: list[str] | None,
    cameras: list[str],
    cameras_on_disk: set[str],
    index: EntityIndex,
    num_samples: int,
) -> ExpressionReport:
    listed = frames or []
    listed_set = set(listed)
    on_disk = {
        "mesh_bin": index.mesh_bins.get(expression, set()),
        "mesh_obj": index.mesh_objs.get(expression, set()),
        "transform": index.transforms.get(expression, set()),
        "average_texture": index.averages.get(expression, set()),
    }
    assets = {kind: _coverage(listed, present) for kind, present in on_disk.items()}
    num_extra_files = sum(
        _num_extra_files(present, listed_set, assets[kind].num_present) for kind, present in on_disk.items()
    )
    if is_sentence(expression):
        assets["audio"] = Coverage(1, int(f"{expression}.wav" in index.audio))
    camera_reports = []
    for camera in cameras:
        photos = index.photos.get((expression, camera), set())
        textures = index.textures.get((expression, camera), set())
        report = CameraCoverage(camera, _coverage(listed, photos), _coverage(listed, textures))
        num_extra_files += _num_extra_files(photos, listed_set, report.photo.num_present)
        num_extra_files += _num_extra_files(textures, listed_set, report.texture.num_present)
        camera_reports.append(report)
    for camera in cameras_on_disk.difference(cameras):
        num_extra_files += _num_extra_files(index.photos.get((expression, camera), set()), listed_set)
        num_extra_files += _num_extra_files(index.textures.get((expression, camera), set()), listed_set)
    return ExpressionReport(
        expression=expression,
        in_frame_list=frames is not None,
        num_frames=len(listed),
        assets=assets,
        cameras=camera_reports,
        num_extra_files=num_extra_files,
        num_samples=num_samples,
    )


# Paths of missing items as format strings mirroring EntityLayout (the tests check that they
# agree): a broken tree can miss hundreds of thousands of files, too many to build a Path each.
_RELATIVE_PATHS = {
    "mesh_bin": MESH_DIR + "/{expression}/{frame}.bin",
    "mesh_obj": MESH_DIR + "/{expression}/{frame}.obj",
    "transform": MESH_DIR + "/{expression}/{frame}_transform.txt",
    "average_texture": TEXTURE_DIR + "/{expression}/" + AVERAGE_DIR + "/{frame}.png",
    "photo": PHOTO_DIR + "/{expression}/{camera}/{frame}.png",
    "texture": TEXTURE_DIR + "/{expression}/{camera}/{frame}.png",
}


def _missing_items(metadata: list[MetadataStatus], expressions: list[ExpressionReport]) -> list[MissingItem]:
    items = [
        MissingItem("metadata", None, None, None, status.name) for status in metadata if not status.present
    ]
    for report in expressions:
        name = report.expression
        audio = report.assets.get("audio")
        if audio is not None and audio.num_present < audio.num_expected:
            items.append(MissingItem("audio", name, None, None, f"{AUDIO_DIR}/{name}.wav"))
        groups: list[tuple[str, str | None, Coverage]] = [
            (kind, None, report.assets[kind]) for kind in EXPRESSION_KINDS[:4]
        ]
        groups += [
            (kind, camera.camera, getattr(camera, kind)) for camera in report.cameras for kind in CAMERA_KINDS
        ]
        for kind, camera, coverage in groups:
            path = _RELATIVE_PATHS[kind]
            items.extend(
                MissingItem(
                    kind, name, camera, frame, path.format(expression=name, camera=camera, frame=frame)
                )
                for frame in coverage.missing_frames
            )
    return items


def scan_entity(root: Path) -> CompletenessReport:
    """Scan a downloaded entity folder and report what is present and what is missing.

    Args:
        root: the entity folder, e.g. ``.../m--20180227--0000--6795937--GHS``.

    Returns:
        The report; a broken entity (missing folders, unparseable files) is described in it.

    Raises:
        FileNotFoundError: ``root`` is not a folder (missing, or a file), so there is nothing to scan.
    """
    root = Path(root)
    if not root.is_dir():
        problem = "is a file, not an entity folder" if root.exists() else "no such entity folder"
        raise FileNotFoundError(
            f"{root}: {problem}; pass the folder of a downloaded entity, e.g. "
            "m--20180227--0000--6795937--GHS, the one that holds KRT, frame_list.txt and images/"
        )
    root = root.resolve()
    layout = EntityLayout(root)
    checked = [_check_metadata(layout, name) for name in METADATA_FILES]
    metadata = [status for status, _ in checked]
    parsed = {status.name: value for status, value in checked}
    krt = parsed["KRT"]
    frame_list = parsed["frame_list.txt"]
    index = index_entity(layout)

    cameras_on_disk: dict[str, set[str]] = {}
    for expression, camera in (*index.photos, *index.textures):
        cameras_on_disk.setdefault(expression, set()).add(camera)
    all_cameras_on_disk = index.cameras
    if isinstance(krt, dict):
        cameras, camera_source = list(krt), "KRT"
        cameras_not_in_krt = sorted(all_cameras_on_disk.difference(krt))
    else:
        cameras, camera_source, cameras_not_in_krt = sorted(all_cameras_on_disk), "listing", []

    num_samples: Counter[str] = Counter()
    if isinstance(krt, dict) and isinstance(frame_list, list):
        num_samples = _count_samples(frame_list, list(krt), index)
    frames = _frames_by_expression(frame_list if isinstance(frame_list, list) else [])
    names = [*frames, *sorted(index.expressions.difference(frames))]
    expressions = [
        _scan_expression(
            name, frames.get(name), cameras, cameras_on_disk.get(name, set()), index, num_samples[name]
        )
        for name in names
    ]
    try:
        entity_id: str | None = entity_id_of(root.name)
    except ValueError:
        entity_id = None
    return CompletenessReport(
        root=str(root),
        entity=root.name,
        entity_id=entity_id,
        metadata=metadata,
        cameras=cameras,
        camera_source=camera_source,
        cameras_not_in_krt=cameras_not_in_krt,
        expressions=expressions,
        num_files=index.num_files,
        num_samples=sum(num_samples.values()),
        missing=_missing_items(metadata, expressions),
    )


def _percent_cell(tally: Tally) -> str:
    if tally.num_expected == 0:
        return "-"
    # One decimal, floored like Tally.percent, so "100.0%" is only ever printed when complete.
    return f"{1000 * tally.num_present // tally.num_expected / 10:.1f}%"


_TABLE_COLUMNS = {kind: kind for kind in (*EXPRESSION_KINDS, *CAMERA_KINDS, "all")} | {
    "average_texture": "average"
}


def format_report(report: CompletenessReport, max_missing: int = 20) -> str:
    """Render a report as text: metadata, an expressions x assets table of percentages, missing files.

    Args:
        report: from :func:`scan_entity`.
        max_missing: how many missing items to list; the rest are counted.
    """
    num_errors = sum(not status.parseable for status in report.metadata)
    state = "complete" if report.complete else f"INCOMPLETE: {len(report.missing):,} missing files"
    if num_errors:
        state += f", {num_errors} metadata file(s) missing or unparseable"
    lines = [
        f"Entity {report.entity} (id {report.entity_id or '?'}) at {report.root}",
        f"Status: {state}",
        "",
    ]
    lines.append("Metadata:")
    for status in report.metadata:
        verdict = "ok" if status.parseable else ("MISSING" if not status.present else "UNPARSEABLE")
        lines.append(f"  {status.name:<15} {verdict}" + ("" if status.parseable else f"  {status.error}"))
    cameras = f"Cameras: {len(report.cameras)} from {report.camera_source}"
    if report.cameras_not_in_krt:
        cameras += f"; on disk but not in KRT: {', '.join(report.cameras_not_in_krt)}"
    lines += [
        cameras,
        f"Files: {report.num_files:,} listed, {report.num_extra_files:,} for frames not in frame_list.txt; "
        f"{report.num_samples:,} trainable samples",
        "",
    ]

    rows = [
        [expression.expression + ("" if expression.in_frame_list else " *"), f"{expression.num_frames:,}"]
        + [_percent_cell(expression.totals().get(kind, Tally(0, 0))) for kind in _TABLE_COLUMNS]
        + [f"{expression.num_samples:,}", f"{expression.num_extra_files:,}"]
        for expression in report.expressions
    ]
    totals = report.totals()
    num_frames = sum(expression.num_frames for expression in report.expressions)
    rows.append(
        ["total", f"{num_frames:,}"]
        + [_percent_cell(totals[kind]) for kind in _TABLE_COLUMNS]
        + [f"{report.num_samples:,}", f"{report.num_extra_files:,}"]
    )
    header = ["expression", "frames", *_TABLE_COLUMNS.values(), "samples", "extra"]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    if any(not expression.in_frame_list for expression in report.expressions):
        lines.append("* on disk but not in frame_list.txt (nothing expected)")

    lines += ["", f"Missing files: {len(report.missing):,}"]
    shown = report.missing_items(0, max_missing)
    for item in shown:
        where = " ".join(part for part in (item.expression, item.camera, item.frame) if part)
        lines.append(f"  {item.kind:<15} {where:<40} {item.path}")
    if len(report.missing) > len(shown):
        lines.append(f"  ... and {len(report.missing) - len(shown):,} more")
    return "\n".join(lines)
