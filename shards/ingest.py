"""Ingest: turn a downloaded entity into WebDataset shards with a checksummed manifest.

Streaming (one sample in memory per worker), parallel (threads: reading, hashing and CRC
checks release the GIL), atomic (temp + fsync + rename per shard, manifest rewritten after each
publish), resumable (a rerun keeps published shards) and deterministic (same input, same bytes).
Samples whose files are missing or corrupt are left out and listed in the manifest with the
file and the reason; they never stop the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from shards.codecs import check_codec, encode_image, image_member
from shards.errors import FormatError
from shards.formats import (
    Camera,
    check_png,
    parse_frame_list,
    parse_krt,
    parse_obj,
    parse_png,
    parse_scalar,
    parse_transform,
    parse_vert_mean,
    parse_vertices,
    read_bytes,
)
from shards.layout import EntityLayout, entity_id_of
from shards.manifest import (
    META_DIR,
    SHARD_DIR,
    ExcludedSample,
    FileEntry,
    Manifest,
    ShardEntry,
    load_manifest,
    photo_shard_name,
    save_manifest,
    sha256_file,
    write_atomic,
)
from shards.samples import SampleKey, enumerate_samples, index_entity
from shards.writer import ShardWriter, is_temp_name

DEFAULT_SHARD_SIZE = 1_000_000_000
SIZE_SAMPLE_COUNT = 32
TOPOLOGY_NAME = "topology.obj"
CAMERAS_NAME = "cameras.json"


LOCK_NAME = ".ingest.lock"


class IngestBusy(RuntimeError):
    """Another process is ingesting the same entity into the same folder."""


class IngestCancelled(Exception):
    """The ingest was cancelled; published shards stay and a rerun resumes."""


@dataclass
class IngestProgress:
    """Counters of a running ingest, updated as samples are written (thread-safe reads)."""

    samples_total: int = 0
    samples_done: int = 0
    bytes_done: int = 0
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    excluded: list[ExcludedSample] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        elapsed = time.monotonic() - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from the sample rate so far; None before the first sample."""
        elapsed = time.monotonic() - self.started
        if self.samples_done == 0 or elapsed <= 0:
            return None
        return (self.samples_total - self.samples_done) / (self.samples_done / elapsed)


@dataclass(frozen=True)
class ShardPlan:
    name: str
    expression: str
    samples: tuple[SampleKey, ...]


def parse_size(text: str) -> int:
    """Parse a byte size such as ``1GB``, ``256MB``, ``64k`` or ``1000000``."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
    cleaned = text.strip().lower()
    number = cleaned.rstrip("kmgb")
    try:
        value = int(float(number) * units[cleaned[len(number) :]])
    except (ValueError, KeyError):
        raise ValueError(
            f"shard size {text!r} is not a size; use e.g. 1GB, 256MB, 64k or a byte count"
        ) from None
    if value <= 0:
        raise ValueError(f"shard size {text!r} must be positive")
    return value


def _mix_order(entity: str, sample: SampleKey) -> str:
    # A seeded hash interleaves frames and cameras so that any shard is a well-mixed slice of
    # its expression, and the order is the same on every run.
    return hashlib.sha256(f"{entity}/{sample.key}".encode()).hexdigest()


def plan_shards(entity: str, samples: list[SampleKey], samples_per_shard: int) -> list[ShardPlan]:
    """Split samples into shards: one expression per shard, frames and cameras interleaved."""
    by_expression: dict[str, list[SampleKey]] = {}
    for sample in samples:
        by_expression.setdefault(sample.expression, []).append(sample)
    plans = []
    for expression, members in by_expression.items():
        members = sorted(members, key=lambda sample: _mix_order(entity, sample))
        for number, start in enumerate(range(0, len(members), samples_per_shard)):
            plans.append(
                ShardPlan(
                    name=f"{SHARD_DIR}/{expression}-{number:06d}.tar",
                    expression=expression,
                    samples=tuple(members[start : start + samples_per_shard]),
                )
            )
    return plans


def _sample_paths(layout: EntityLayout, sample: SampleKey) -> dict[str, Path]:
    expression, frame, camera = sample.expression, sample.frame, sample.camera
    return {
        "photo.png": layout.photo(expression, camera, frame),
        "tex.png": layout.texture(expression, camera, frame),
        "avg_tex.png": layout.average_texture(expression, frame),
        "verts.bin": layout.mesh_bin(expression, frame),
        "transform.txt": layout.transform(expression, frame),
    }


def _estimate_sample_bytes(layout: EntityLayout, samples: list[SampleKey]) -> int:
    step = max(1, len(samples) // SIZE_SAMPLE_COUNT)
    sizes = []
    for sample in samples[::step][:SIZE_SAMPLE_COUNT]:
        total = 0
        for path in _sample_paths(layout, sample).values():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        sizes.append(total)
    return max(1, sum(sizes) // max(1, len(sizes)) + 4096)


FRAME_MEMBERS = ("avg_tex.png", "verts.bin", "transform.txt")
FRAME_CACHE_ENTRIES = 48


def _read_checked(extension: str, path: Path, image_codec: str = "png") -> bytes:
    data = read_bytes(path)
    if extension.endswith(".png"):
        check_png(data, str(path))
        if image_codec != "png":
            return encode_image(parse_png(data, str(path)), image_codec)
    elif extension == "verts.bin":
        parse_vertices(data, str(path))
    else:
        try:
            parse_transform(data.decode(), str(path))
        except UnicodeDecodeError:
            raise FormatError(str(path), "UTF-8 text") from None
    return data


def _remember(cache: OrderedDict, path: Path, value: bytes | FormatError) -> None:
    cache[path] = value
    if len(cache) > FRAME_CACHE_ENTRIES:
        cache.popitem(last=False)


class _EntityReader:
    """Reads and validates one sample's files; the metadata it needs is parsed once."""

    def __init__(
        self, layout: EntityLayout, cameras: dict[str, Camera], broken: dict[str, str], image_codec: str = "png"
    ):
        self.layout = layout
        self.cameras = cameras
        self.broken = broken
        self.image_codec = image_codec

    def read(self, sample: SampleKey, frame_cache: OrderedDict | None = None) -> dict[str, bytes]:
        """Return the sample's members in their fixed order; raise ``FormatError`` if unusable.

        Args:
            sample: the sample to read.
            frame_cache: checked per-frame members (average texture, mesh, pose) shared by the
                cameras of a frame, so each is read and checked once per shard, not per camera.
        """
        if sample.camera in self.broken:
            raise FormatError(str(self.layout.krt), f"a well-formed block for camera {sample.camera}")
        members = {}
        for extension, path in _sample_paths(self.layout, sample).items():
            cached = extension in FRAME_MEMBERS and frame_cache is not None
            if cached and path in frame_cache:
                data = frame_cache[path]
                frame_cache.move_to_end(path)
                if isinstance(data, FormatError):
                    raise data
            else:
                try:
                    data = _read_checked(extension, path, self.image_codec)
                except FormatError as error:
                    if cached:
                        _remember(frame_cache, path, error)
                    raise
                if cached:
                    _remember(frame_cache, path, data)
            if self.image_codec != "png" and extension.endswith(".png"):
                extension = image_member(extension[: -len(".png")], self.image_codec)
            members[extension] = data
        camera = self.cameras[sample.camera]
        members["camera.txt"] = camera.text.encode()
        members["sample.json"] = json.dumps(
            {
                "entity": self.layout.name,
                "expression": sample.expression,
                "frame": sample.frame,
                "camera": sample.camera,
                "camera_index": camera.index,
            },
            sort_keys=True,
        ).encode()
        return members


def _write_shard(
    out: Path,
    plan: ShardPlan,
    reader: _EntityReader,
    progress: IngestProgress,
    lock: threading.Lock,
    cancel: threading.Event | None,
    on_sample: Callable[[], None] | None,
    photo_shards: bool = False,
) -> tuple[ShardEntry, list[ExcludedSample]]:
    excluded = []
    per_camera: dict[str, int] = {}
    frame_cache: OrderedDict = OrderedDict()
    photo_name = photo_shard_name(plan.name)
    with ShardWriter(out / plan.name) as shard, contextlib.ExitStack() as companion:
        photos = companion.enter_context(ShardWriter(out / photo_name)) if photo_shards else None
        for sample in plan.samples:
            if cancel is not None and cancel.is_set():
                raise IngestCancelled()
            try:
                members = reader.read(sample, frame_cache)
            except FormatError as error:
                excluded.append(ExcludedSample(sample.key, error.source, error.expected))
                members = None
            if members is not None:
                if photos is not None:
                    photos.add(sample.key, {name: data for name, data in members.items() if _is_photo(name)})
                    shard.add(sample.key, {name: data for name, data in members.items() if not _is_photo(name)})
                else:
                    shard.add(sample.key, members)
                per_camera[sample.camera] = per_camera.get(sample.camera, 0) + 1
            with lock:
                progress.samples_done += 1
                progress.bytes_done += sum(len(data) for data in members.values()) if members else 0
                progress.excluded.extend(excluded[-1:] if members is None else [])
            if on_sample is not None:
                on_sample()
    entry = ShardEntry(
        name=plan.name,
        bytes=shard.size,
        sha256=shard.sha256,
        num_samples=shard.num_samples,
        expressions=[plan.expression],
        cameras=sorted(per_camera),
        samples_per_camera=dict(sorted(per_camera.items())),
        photos=FileEntry(photo_name, photos.size, photos.sha256) if photos is not None else None,
    )
    return entry, excluded


def _is_photo(member: str) -> bool:
    return member.startswith("photo.")


def _publish_metadata(layout: EntityLayout, out: Path, frame_list, cameras, broken) -> list[FileEntry]:
    """Copy and validate the entity's metadata files into ``meta/``; a bad one stops the ingest."""
    (out / META_DIR).mkdir(parents=True, exist_ok=True)
    contents: dict[str, bytes] = {}
    for name in ("KRT", "frame_list.txt", "tex_mean.png", "tex_var.txt", "vert_mean.bin", "vert_var.txt"):
        contents[name] = read_bytes(layout.metadata(name))
    parse_png(contents["tex_mean.png"], str(layout.tex_mean))
    parse_scalar(contents["tex_var.txt"].decode(errors="replace"), str(layout.tex_var))
    parse_scalar(contents["vert_var.txt"].decode(errors="replace"), str(layout.vert_var))
    parse_vert_mean(contents["vert_mean.bin"], str(layout.vert_mean))
    for expression, frame in frame_list:
        path = layout.mesh_obj(expression, frame)
        if path.is_file():
            contents[TOPOLOGY_NAME] = path.read_bytes()
            parse_obj(contents[TOPOLOGY_NAME].decode(), str(path))
            break
    else:
        raise FormatError(
            str(layout.root / "tracked_mesh"), "at least one .obj of a listed frame (the mesh topology)"
        )
    camera_list = [{"name": camera.name, "index": camera.index} for camera in cameras.values()]
    camera_list += [{"name": name, "index": None, "error": error} for name, error in broken.items()]
    contents[CAMERAS_NAME] = (json.dumps(camera_list, indent=1) + "\n").encode()
    entries = []
    for name, data in contents.items():
        path = out / META_DIR / name
        if not path.is_file() or path.read_bytes() != data:
            write_atomic(path, data)
        entries.append(FileEntry(f"{META_DIR}/{name}", len(data), hashlib.sha256(data).hexdigest()))
    return entries


def ingest(
    entity_dir: Path,
    out_root: Path,
    *,
    workers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: IngestProgress | None = None,
    cancel: threading.Event | None = None,
    on_sample: Callable[[], None] | None = None,
    image_codec: str = "png",
    photo_shards: bool = False,
) -> Manifest:
    """Ingest one entity into ``out_root/<entity folder name>/``; resumes a previous run.

    Args:
        entity_dir: the entity folder (``m--YYYYMMDD--HHMM--<ID>--GHS``) in the real layout.
        out_root: folder holding one shard folder per entity.
        workers: shards written at once (default: the CPU count).
        shard_size: target bytes per shard.
        progress: counters to update (a caller may poll them from another thread).
        cancel: set it to stop at the next sample; published shards stay.
        on_sample: called after each sample (for progress bars).
        image_codec: how images are stored: ``"png"`` (the release's bytes, default),
            ``"delta-zstd"`` (lossless, faster to decode) or ``"delta-rice"`` (lossless, decoded
            on the GPU); shards/codecs.py.
        photo_shards: store each shard's photos in a companion shard
            (``<shard>.photo.tar``), so that a run without the screen loss downloads only
            the rest (2.8 of 7.3 MB a sample at 2048x1334).

    Returns:
        The complete manifest, also saved as ``manifest.json``.
    """
    check_codec(image_codec)
    layout = EntityLayout(Path(entity_dir))
    if not layout.root.is_dir():
        raise FileNotFoundError(f"{layout.root}: no such entity folder")
    entity_id = entity_id_of(layout.name)
    out = Path(out_root) / layout.name
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    progress = progress if progress is not None else IngestProgress()
    with open(out / LOCK_NAME, "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IngestBusy(f"{out}: another ingest of this entity is running; wait for it or stop it") from None
        return _ingest_locked(
            layout, out, entity_id, workers, shard_size, progress, cancel, on_sample, image_codec, photo_shards
        )


def _ingest_locked(
    layout, out, entity_id, workers, shard_size, progress, cancel, on_sample, image_codec, photo_shards
) -> Manifest:

    broken: dict[str, str] = {}
    cameras = parse_krt(read_bytes(layout.krt).decode(errors="replace"), str(layout.krt), broken)
    frame_list = parse_frame_list(
        read_bytes(layout.frame_list).decode(errors="replace"), str(layout.frame_list)
    )
    metadata = _publish_metadata(layout, out, frame_list, cameras, broken)

    index = index_entity(layout)
    all_cameras = sorted([*cameras, *broken], key=lambda name: cameras[name].index if name in cameras else -1)
    samples = enumerate_samples(frame_list, list(cameras) + list(broken), index)
    per_shard = max(1, shard_size // _estimate_sample_bytes(layout, samples))
    plans = plan_shards(layout.name, samples, per_shard)

    manifest = Manifest(
        entity=layout.name,
        entity_id=entity_id,
        shard_size=shard_size,
        num_planned_shards=len(plans),
        cameras=[camera for camera in all_cameras if camera in cameras],
        expressions=list(dict.fromkeys(plan.expression for plan in plans)),
        metadata=metadata,
        image_codec=image_codec,
        photo_shards=photo_shards,
    )
    published = _resume(out, manifest, plans)
    _remove_temp_files(out)

    progress.samples_total = len(samples)
    progress.shards_total = len(plans)
    progress.shards_skipped = len(published)
    progress.samples_done = sum(len(plan.samples) for plan in plans if plan.name in published)
    progress.shards_done = len(published)
    todo = [plan for plan in plans if plan.name not in published]
    save_manifest(out, manifest)

    reader = _EntityReader(layout, cameras, broken, image_codec)
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        running: set[Future] = set()
        pending = list(reversed(todo))
        try:
            while pending or running:
                while pending and len(running) < (workers or os.cpu_count() or 1) * 2:
                    plan = pending.pop()
                    running.add(
                        pool.submit(
                            _write_shard, out, plan, reader, progress, lock, cancel, on_sample, photo_shards
                        )
                    )
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    entry, excluded = future.result()
                    manifest.shards.append(entry)
                    # Sorted in memory as in the file, whichever thread finished first.
                    manifest.shards.sort(key=lambda shard: shard.name)
                    manifest.excluded.extend(excluded)
                    manifest.excluded.sort(key=lambda item: (item.key, item.path))
                    progress.shards_done += 1
                    save_manifest(out, manifest)
        except BaseException:
            if cancel is not None:
                cancel.set()
            for future in running:
                future.cancel()
            raise
    manifest.state = "complete"
    save_manifest(out, manifest)
    return manifest


def _remove_temp_files(out: Path) -> None:
    """Delete what a killed run was writing (shards, metadata, manifest under temp names)."""
    for folder in (out, out / SHARD_DIR, out / META_DIR):
        for name in os.listdir(folder):
            if is_temp_name(name):
                (folder / name).unlink(missing_ok=True)


def _resume(out: Path, manifest: Manifest, plans: list[ShardPlan]) -> set[str]:
    """Carry over shards a previous run published for the same plan; return their names."""
    try:
        previous = load_manifest(out)
    except (FileNotFoundError, FormatError):
        return set()
    if (
        previous.shard_size != manifest.shard_size
        or previous.image_codec != manifest.image_codec
        or previous.photo_shards != manifest.photo_shards
        or previous.num_planned_shards != manifest.num_planned_shards
    ):
        return set()
    planned = {plan.name: plan for plan in plans}
    kept = set()
    for entry in previous.shards:
        # Re-hashed, not only sized: a shard damaged in place (a flipped bit keeps its size) is
        # what 'multiface verify' tells users to fix by re-ingesting, so it must be rewritten.
        if entry.name in planned and all(
            (out / file.name).is_file() and sha256_file(out / file.name) == (file.bytes, file.sha256)
            for file in (entry, entry.photos)
            if file is not None
        ):
            manifest.shards.append(entry)
            keys = {sample.key for sample in planned[entry.name].samples}
            manifest.excluded.extend(item for item in previous.excluded if item.key in keys)
            kept.add(entry.name)
    return kept
