"""Streaming training data: verified shards over HTTP (or a local folder) into batches.

The pipeline, per DataLoader worker: shards of this (rank, worker) slot for the epoch ->
fetched whole and checked against the manifest (size, sha256; a shard that fails is refused
before any of its samples is used) -> WebDataset tar expansion, keeping only the members the
run needs -> camera filter -> shuffle buffer -> ``shards.decode`` into the reference fields.

Every rank gets at least one shard per epoch and the stream never ends (epochs follow one
another with a new seeded shuffle), so the trainer decides the steps per epoch from the
manifest and every rank runs the same number of steps with any shard count.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import os
import random
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from webdataset.tariterators import group_by_keys

from shards.decode import ALL_FIELDS, EntityMetadata, decode_sample, decode_stored, members_needed
from shards.errors import IntegrityError
from shards.manifest import MANIFEST_NAME, FileEntry, Manifest, ShardEntry, parse_manifest
from shards.samples import DEFAULT_TEST_PREFIXES, SampleKey, select_expressions
from trainer.shard_buffer import BufferPool, ShardBuffer

TOKEN_ENV = "MULTIFACE_TOKEN"
SPOOL_BYTES = 64 << 20
MEMORY_SHARD_BYTES = 512 << 20
"""Shards up to this size stream through two reused memory buffers per data worker
(``trainer.shard_buffer``); larger ones through temporary files."""


class ShardSource:
    """A manifest and its files, from a data service URL or a local shard folder.

    Args:
        location: ``http(s)://.../manifest.json`` of the data service, a local
            ``manifest.json`` or the entity's shard folder.
        token: bearer token for the data service (default: the ``MULTIFACE_TOKEN`` variable).
        stall_timeout: seconds without a byte before a download is abandoned and retried.
    """

    def __init__(self, location: str, token: str | None = None, stall_timeout: float = 60.0):
        self.location = location
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.stall_timeout = stall_timeout
        self.remote = location.startswith(("http://", "https://"))
        if self.remote:
            if not location.endswith(MANIFEST_NAME):
                raise ValueError(f"--shards {location!r}: a data-service URL must end with /{MANIFEST_NAME}")
            self.base = location[: -len(MANIFEST_NAME)]
        else:
            path = Path(location)
            self.base = str(path.parent if path.name == MANIFEST_NAME else path)
            if not (Path(self.base) / MANIFEST_NAME).is_file():
                raise FileNotFoundError(
                    f"--shards {location!r}: no {MANIFEST_NAME} there; run 'multiface ingest' first"
                )
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> Manifest:
        if self.remote:
            from shards.remote import open_manifest

            return open_manifest(self.location, token=self.token, timeout=self.stall_timeout)
        path = Path(self.base) / MANIFEST_NAME
        return parse_manifest(path.read_bytes(), str(path))

    def open_verified(self, entry: FileEntry, buffer: ShardBuffer | None = None) -> BinaryIO:
        """The file's bytes after its size and sha256 matched the manifest, positioned at 0.

        Args:
            entry: the manifest's entry for the file.
            buffer: a closed :class:`ShardBuffer` to read into when the file is at most
                ``MEMORY_SHARD_BYTES`` (it is returned, open; closing it releases it); larger
                files, or none given, go to a temporary file spooled to disk past 64 MB (the
                buffer is then released at once).
        """
        spool: BinaryIO
        if buffer is not None and entry.bytes <= MEMORY_SHARD_BYTES:
            spool = buffer.open(entry.bytes)  # type: ignore[assignment]
        else:
            if buffer is not None:
                buffer.release()
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # type: ignore[assignment]
        try:
            self._read_verified(entry, spool)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    def _read_verified(self, entry: FileEntry, spool: BinaryIO) -> None:
        if self.remote:
            from shards.remote import fetch_file

            fetch_file(
                self.base, entry.name, spool, entry, token=self.token, stall_timeout=self.stall_timeout
            )
            return
        digest = hashlib.sha256()
        with open(Path(self.base) / entry.name, "rb") as handle:
            if isinstance(spool, ShardBuffer):
                spool.fill(handle, digest)
            else:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    spool.write(chunk)
        size = spool.tell()
        if size != entry.bytes or digest.hexdigest() != entry.sha256:
            raise IntegrityError(
                f"{self.base}/{entry.name}: {size} bytes with sha256 {digest.hexdigest()}, "
                f"manifest says {entry.bytes} bytes, {entry.sha256}; refusing this shard "
                "(re-ingest it, or run 'multiface verify')"
            )

    def open_shard(self, shard: ShardEntry, photos: bool, pool: BufferPool | None = None) -> dict:
        """A verified shard for :func:`verified_members`: ``{"url", "stream", "photos"}``.

        Args:
            shard: the shard's manifest entry.
            photos: the run reads photos: fetch the shard's photo companion too, if it has one
                (``ingest --photo-shards``); ``"photos"`` is None otherwise.
            pool: memory buffers to read into (see :meth:`open_verified`), or None.
        """
        stream = self.open_verified(shard, pool.lend() if pool is not None else None)
        companion = None
        if photos and shard.photos is not None:
            try:
                companion = self.open_verified(shard.photos, pool.lend() if pool is not None else None)
            except BaseException:
                stream.close()
                raise
        return {"url": shard.name, "stream": stream, "photos": companion}

    def metadata(self) -> EntityMetadata:
        files = {}
        for entry in self.manifest.metadata:
            with self.open_verified(entry) as handle:
                files[Path(entry.name).name] = handle.read()
        return EntityMetadata.from_files(files)


def verified_members(shards: Iterator[dict], keep: Callable[[str], bool]) -> Iterator[dict]:
    """The regular-file members of verified shards, as webdataset's ``tar_file_expander`` yields
    them (``fname``, ``data``, ``__url__``) for its ``group_by_keys``.

    Args:
        shards: ``{"url", "stream", "photos"}`` per shard (:meth:`ShardSource.open_shard`);
            a photo companion's members are yielded with their samples, photo first, as a shard
            without a companion orders them.
        keep: which member names to read.

    A verified shard is a seekable file already checked whole, so it is read with the tar
    module's random-access mode, one read per member, rather than webdataset's streaming mode
    (which copies every member through 10 KB records: about a tenth of a sample's CPU time).
    """
    for item in shards:
        photos: dict[str, list[dict]] | None = None
        if item.get("photos") is not None:
            with item["photos"] as companion:
                photos = {}
                for name, data in _tar_members(companion, keep, f"{item['url']} (its photo shard)"):
                    photos.setdefault(_sample_key(name), []).append(_member(name, data, item["url"]))
        with item["stream"] as stream:
            key = None
            for name, data in _tar_members(stream, keep, item["url"]):
                if photos is not None and _sample_key(name) != key:
                    key = _sample_key(name)
                    if key not in photos:
                        raise IntegrityError(f"{item['url']}: its photo shard has no photo of sample {key}")
                    yield from photos.pop(key)
                yield _member(name, data, item["url"])
        if photos:
            raise IntegrityError(
                f"{item['url']}: its photo shard has photos of other samples ({sorted(photos)[:3]})"
            )


def _member(name: str, data: bytes, url: str) -> dict:
    return {"fname": name, "data": data, "__url__": url}


def _sample_key(name: str) -> str:
    """The sample key of a member name, as webdataset splits it (at the base name's first dot)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def _tar_members(stream: BinaryIO, keep: Callable[[str], bool], url: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        for member in archive:
            if not member.isreg() or not keep(member.name):
                continue
            # Straight from the member's offset: one copy (extractfile's reader makes three).
            stream.seek(member.offset_data)
            data = stream.read(member.size)
            if len(data) != member.size:
                raise IntegrityError(f"{url}: member {member.name} ends past the end of the shard")
            yield member.name, data
        archive.members = []  # the random-access mode keeps every header otherwise


@dataclass(frozen=True)
class Split:
    """Which samples a run reads: expressions by prefix (the reference rule) and cameras."""

    test_prefixes: tuple[str, ...] = DEFAULT_TEST_PREFIXES
    train_cameras: tuple[str, ...] | None = None
    test_cameras: tuple[str, ...] | None = None

    def wants_expression(self, expression: str, part: str) -> bool:
        if part == "train":
            return select_expressions(expression, exclude_prefix=self.test_prefixes)
        return select_expressions(expression, valid_prefix=self.test_prefixes)

    def cameras(self, part: str) -> tuple[str, ...] | None:
        return self.train_cameras if part == "train" else self.test_cameras


def select_shards(manifest: Manifest, split: Split, part: str) -> tuple[list[ShardEntry], int]:
    """Shards holding samples of ``part`` ("train" or "test"), and how many samples they give."""
    if part not in ("train", "test"):
        raise ValueError(f"part {part!r}: expected 'train' or 'test'")
    cameras = split.cameras(part)
    chosen, total = [], 0
    for shard in sorted(manifest.shards, key=lambda shard: shard.name):
        if not all(split.wants_expression(expression, part) for expression in shard.expressions):
            continue
        count = sum(
            n for camera, n in shard.samples_per_camera.items() if cameras is None or camera in cameras
        )
        if count:
            chosen.append(shard)
            total += count
    return chosen, total


def slot_shards(
    shards: Sequence[ShardEntry], epoch: int, seed: int, slot: int, num_slots: int
) -> list[ShardEntry]:
    """The shards one (rank, worker) slot reads in an epoch.

    Shards are shuffled with ``(seed, epoch)`` and dealt round-robin. With fewer shards than
    slots the list is repeated so that no slot is ever empty (a rank that runs dry would hang
    the others at the next collective).
    """
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    repeats = -(-num_slots // max(1, len(order)))
    return (order * repeats)[slot::num_slots]


class _AheadFetcher:
    """Verified shards in plan order, the next one fetched in a thread while this one is read.

    The fetch (socket reads and sha256, both outside the GIL) overlaps the worker's decoding,
    so a worker spends the longer of the two per shard rather than their sum; across epochs
    too. Costs one more shard's memory per worker (a second reused buffer). ``next_epoch``
    says which epoch the next shard belongs to without waiting for it.
    """

    def __init__(
        self,
        open_shard: Callable[[ShardEntry, BufferPool], dict],
        plan: Iterator[tuple[int, ShardEntry]],
    ):
        self._open = open_shard
        self._plan = plan
        self._buffers = BufferPool()  # the shard read and the one arriving (and their photo shards)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-fetch")
        self._next = self._submit()

    def _submit(self) -> tuple[int, ShardEntry, concurrent.futures.Future]:
        epoch, shard = next(self._plan)
        return epoch, shard, self._pool.submit(self._open, shard, self._buffers)

    def next_epoch(self) -> int:
        return self._next[0]

    def take(self) -> tuple[ShardEntry, concurrent.futures.Future]:
        """The next shard and its fetch (``result()`` waits; raises what the fetch raised)."""
        _, shard, fetch = self._next
        self._next = self._submit()
        return shard, fetch

    def __enter__(self) -> _AheadFetcher:
        return self

    def __exit__(self, *exc) -> None:
        fetch = self._next[2]
        if not fetch.cancel():
            fetch.add_done_callback(_close_result)  # a stream stopped early: drop the shard read ahead
        self._pool.shutdown(wait=False, cancel_futures=True)


def _close_result(fetch: concurrent.futures.Future) -> None:
    if not fetch.cancelled() and fetch.exception() is None:
        shard = fetch.result()
        for stream in (shard["stream"], shard["photos"]):
            if stream is not None:
                stream.close()


class ShardStream(torch.utils.data.IterableDataset):
    """An endless, epoch-by-epoch stream of decoded samples for one rank.

    Args:
        source: where the shards are.
        shards: the shards of this split (see :func:`select_shards`).
        num_samples: samples of the split in those shards.
        split, part: camera and expression selection.
        rank, world_size: this process's place in the job.
        tex_size: texture side passed to the decoder.
        fields: reference fields to decode (leave out ``photo`` when the screen loss is off:
            photo shards, ``ingest --photo-shards``, are then never downloaded).
        seed: shuffle seed; the shard order of epoch e is the same on every rank.
        shuffle_buffer: samples held for shuffling, per worker.
        start_epoch: first epoch (a resumed run continues the shuffle sequence).
        device_finish: yield images as stored uint8 (``shards.decode.decode_stored``, delta-zstd
            images still row-filtered) for ``trainer.gpu_decode.finish_on_device`` to unfilter
            and normalise on the GPU; default False
            yields ``decode_sample``'s fields.
    """

    def __init__(
        self,
        source: ShardSource,
        shards: Sequence[ShardEntry],
        num_samples: int,
        split: Split,
        part: str,
        rank: int,
        world_size: int,
        tex_size: int,
        fields: Sequence[str] = ALL_FIELDS,
        seed: int = 0,
        shuffle_buffer: int = 256,
        start_epoch: int = 0,
        device_finish: bool = False,
    ):
        super().__init__()
        if not shards:
            raise ValueError(
                f"no shard holds {part} samples; check --test_segment_config and --camera_config"
            )
        self.source = source
        self.shards = list(shards)
        self.num_samples = num_samples
        self.split = split
        self.part = part
        self.rank = rank
        self.world_size = world_size
        self.tex_size = tex_size
        self.fields = tuple(fields)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_epoch = start_epoch
        self.device_finish = device_finish
        self._needed = members_needed(self.fields)
        self._photos = any(member.startswith("photo.") for member in self._needed)
        self._meta: EntityMetadata | None = None
        self.refused: list[str] = []

    def _slot(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _verified_streams(self, fetcher: _AheadFetcher, epoch: int) -> Iterator[dict]:
        """This slot's verified shards of ``epoch`` (a refused one is reported and skipped)."""
        while fetcher.next_epoch() == epoch:
            shard, fetch = fetcher.take()
            try:
                files = fetch.result()
            except IntegrityError as error:
                # Refused, reported, never trained on; the other shards go on.
                self.refused.append(shard.name)
                print(f"rank {self.rank}: refused shard {shard.name}: {error}", file=sys.stderr, flush=True)
                continue
            yield files

    def _keep_member(self, name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.split(".", 1)[-1] in self._needed

    def __iter__(self) -> Iterator[dict]:
        return map(self.decode, self.raw_samples())

    def raw_samples(self) -> Iterator[dict]:
        """The stream's samples in order, undecoded (their tar members); :meth:`decode` each."""
        if self._meta is None:
            self._meta = self.source.metadata()
        cameras = self.split.cameras(self.part)
        slot, num_slots = self._slot()
        rng = random.Random(f"{self.seed}/buffer/{slot}")
        # The buffer never needs to outgrow one slot's share of an epoch: on a small split a
        # full-size buffer would only re-read the same shards before the first sample.
        buffer_size = max(1, min(self.shuffle_buffer, self.num_samples // num_slots))
        plan = (
            (epoch, shard)
            for epoch in itertools.count(self.start_epoch)
            for shard in slot_shards(self.shards, epoch, self.seed, slot, num_slots)
        )

        def open_shard(shard: ShardEntry, pool: BufferPool) -> dict:
            return self.source.open_shard(shard, self._photos, pool)

        with _AheadFetcher(open_shard, plan) as fetcher:
            yield from self._epochs(fetcher, cameras, rng, buffer_size)

    def _epochs(
        self, fetcher: _AheadFetcher, cameras: tuple[str, ...] | None, rng: random.Random, buffer_size: int
    ) -> Iterator[dict]:
        buffer: list[dict] = []
        epoch = self.start_epoch
        while True:
            files = verified_members(self._verified_streams(fetcher, epoch), self._keep_member)
            taken = 0
            for sample in group_by_keys(files):
                key = SampleKey.from_key(sample["__key__"])
                if not self.split.wants_expression(key.expression, self.part):
                    continue
                if cameras is not None and key.camera not in cameras:
                    continue
                buffer.append(sample)
                taken += 1
                if len(buffer) >= buffer_size:
                    yield buffer.pop(rng.randrange(len(buffer)))
            if taken == 0:
                raise RuntimeError(
                    f"rank {self.rank}: no usable sample in a whole epoch of its shards "
                    f"(refused: {', '.join(self.refused) or 'none'}); check 'multiface verify' on the server"
                )
            epoch += 1

    def decode(self, sample: dict, out: Mapping[str, np.ndarray] | None = None) -> dict:
        """A raw sample's fields (``decode_sample``'s, or ``decode_stored``'s with ``device_finish``).

        Args:
            sample: from :meth:`raw_samples`.
            out: with ``device_finish``, arrays to decode images into where shapes agree.
        """
        if self._meta is None:
            self._meta = self.source.metadata()
        if self.device_finish:
            return decode_stored(sample, self._meta, self.fields, keep_row_filter=True, out=out)
        return decode_sample(sample, self._meta, self.tex_size, self.fields)
