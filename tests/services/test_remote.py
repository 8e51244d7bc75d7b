"""``shards.remote`` against a live server: resume, stall timeout, replaced and truncated shards,
verified streams, and plain webdataset over HTTP. RELIABILITY.md rows 11, 12, 13 (client side)."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest
import webdataset
from fault_proxy import FaultProxy
from service_harness import CRAFTED, LiveServer, publish, settings_for, sha256_of

from shards.errors import IntegrityError
from shards.manifest import FileEntry, load_manifest
from shards.remote import FetchError, fetch_file, open_manifest, verified_streams

MEMBER_SOURCES = {
    "photo.png": "images/{exp}/{cam}/{frame}.png",
    "tex.png": "unwrapped_uv_1024/{exp}/{cam}/{frame}.png",
    "avg_tex.png": "unwrapped_uv_1024/{exp}/average/{frame}.png",
    "verts.bin": "tracked_mesh/{exp}/{frame}.bin",
    "transform.txt": "tracked_mesh/{exp}/{frame}_transform.txt",
}


def base(server_url: str, entity: str) -> str:
    return f"{server_url}/api/v1/entities/{entity}/"


@pytest.fixture
def synthetic(session_server, published_root, entity_name):
    return load_manifest(published_root / entity_name)


def test_fetch_resumes_with_range_and_if_range_after_resets(session_server, synthetic, entity_name, tmp_path):
    """Pins row 11: a connection reset mid-shard must resume from the byte reached (Range +
    If-Range with the manifest ETag), not restart or give up, and end with the right sha256."""
    shard = max(synthetic.shards, key=lambda entry: entry.bytes)
    assert shard.bytes > 100_000
    faults = [("reset", 30_000), ("reset", 30_000), ("reset", 30_000)]
    with FaultProxy(session_server.port, faults) as proxy:
        dest = tmp_path / "shard.tar"
        fetch_file(base(proxy.url, entity_name), shard.name, dest, shard, stall_timeout=5, retries=2)
    assert sha256_of(dest.read_bytes()) == shard.sha256
    assert len(proxy.requests) == 4
    assert b"Range:" not in proxy.requests[0]
    for head in proxy.requests[1:]:
        assert b"Range: bytes=" in head and f'If-Range: "{shard.sha256}"'.encode() in head
    offsets = [int(head.split(b"Range: bytes=")[1].split(b"-")[0]) for head in proxy.requests[1:]]
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert not list(tmp_path.glob(".*.part"))


def test_fetch_into_a_reused_shard_buffer_resumes_and_holds_exactly_the_shard(
    session_server, synthetic, entity_name
):
    """Pins the trainer's memory path (trainer.shard_buffer): a buffer that held a larger file
    before receives a shard through connection resets (Range resumes write at the byte reached)
    and then holds exactly that shard, no byte of the old file after its end."""
    from trainer.shard_buffer import ShardBuffer

    shard = max(synthetic.shards, key=lambda entry: entry.bytes)
    buffer = ShardBuffer()
    with buffer.open(shard.bytes + 50_000) as old:
        old.write(b"\xff" * (shard.bytes + 50_000))
    with FaultProxy(session_server.port, [("reset", 30_000), ("reset", 30_000)]) as proxy:
        with buffer.open(shard.bytes) as handle:
            fetch_file(base(proxy.url, entity_name), shard.name, handle, shard, stall_timeout=5, retries=2)
            assert handle.tell() == shard.bytes
            handle.seek(0)
            assert sha256_of(handle.read()) == shard.sha256
    assert len(proxy.requests) == 3


def test_stalled_body_raises_within_the_stall_timeout(session_server, synthetic, entity_name):
    """Pins row 12: a server that stops sending mid-body must make the client raise within its
    stall timeout (per attempt), not block until NCCL's 10-minute watchdog."""
    shard = synthetic.shards[0]
    with FaultProxy(session_server.port, [("stall", 20_000), ("stall", 20_000)]) as proxy:
        started = time.monotonic()
        with pytest.raises(FetchError, match="gave up after 1 retries"):
            fetch_file(
                base(proxy.url, entity_name), shard.name, io.BytesIO(), shard, stall_timeout=1.0, retries=1
            )
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5.0


def test_wrong_expectations_raise_integrity_error(session_server, synthetic, entity_name):
    """Pins the final check: bytes that do not match the manifest entry raise IntegrityError
    naming the shard (a stale manifest, a server with other content)."""
    shard = synthetic.shards[0]
    wrong = FileEntry(shard.name, shard.bytes, "0" * 64)
    with pytest.raises(IntegrityError, match=shard.name):
        fetch_file(base(session_server.url, entity_name), shard.name, io.BytesIO(), wrong, retries=0)
    with pytest.raises(FetchError, match="404"):
        fetch_file(base(session_server.url, entity_name), "shards/none.tar", io.BytesIO(), shard, retries=0)


class SlowSink(io.BytesIO):
    """A destination that takes its time, so the test can act while the download runs."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.first_chunk = threading.Event()

    def write(self, data) -> int:
        self.first_chunk.set()
        time.sleep(self.delay)
        return super().write(data)


def _fetch_in_thread(url, entry, sink, outcome, **options):
    def run():
        try:
            fetch_file(url, entry.name, sink, entry, **options)
            outcome["ok"] = True
        except Exception as error:  # recorded for the test to check
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture
def changing(own_roots):
    data_root, shard_root = own_roots
    old = os.urandom(32 << 20)
    manifest = publish(shard_root, CRAFTED, {"shards/moving-000000.tar": old})
    with LiveServer(settings_for(data_root, shard_root, chunk_bytes=256 << 10)) as server:
        yield server, shard_root / CRAFTED, manifest.shards[0], old


def test_atomic_replace_serves_old_bytes_whole_or_fails(changing):
    """Pins row 13 (replace): a shard replaced by rename (re-ingest) during a download must give
    the old bytes whole; a resume after the replacement must fail loudly, never splice."""
    server, folder, entry, old = changing
    sink, outcome = SlowSink(0.05), {}
    thread = _fetch_in_thread(base(server.url, CRAFTED), entry, sink, outcome, retries=0)
    assert sink.first_chunk.wait(10)
    new = os.urandom(len(old))
    publish(folder.parent, CRAFTED, {"shards/moving-000000.tar.new": new})
    os.replace(folder / "shards/moving-000000.tar.new", folder / "shards/moving-000000.tar")
    publish(folder.parent, CRAFTED, {"shards/moving-000000.tar": new})
    thread.join(30)
    assert outcome.get("ok") and sha256_of(sink.getvalue()) == entry.sha256

    with FaultProxy(server.port, [("reset", 4 << 20)]) as proxy:
        with pytest.raises(IntegrityError, match="changed"):
            fetch_file(base(proxy.url, CRAFTED), entry.name, io.BytesIO(), entry, retries=2)


def test_truncate_in_place_is_an_error_never_a_short_or_padded_file(changing):
    """Pins row 13 (truncate): a shard truncated in place during a download must end in an error
    (the response is cut, the resume refused), never a short, padded or mixed file."""
    server, folder, entry, old = changing
    sink, outcome = SlowSink(0.05), {}
    thread = _fetch_in_thread(base(server.url, CRAFTED), entry, sink, outcome, retries=2)
    assert sink.first_chunk.wait(10)
    with open(folder / entry.name, "r+b") as handle:
        handle.truncate(len(old) // 4)
    thread.join(30)
    assert "ok" not in outcome
    assert isinstance(outcome["error"], FetchError | IntegrityError), outcome
    assert "409" in str(outcome["error"]) or "sha256" in str(outcome["error"])
    assert old.startswith(sink.getvalue()[: len(old) // 4])
    metrics = server.runtime.metrics
    assert metrics.errors.labels("file_shrank_while_serving")._value.get() == 1


def test_verified_streams_refuse_a_corrupt_shard_before_any_sample(own_roots, entity_name):
    """Pins that a shard with a flipped bit (same size, so the server serves it) is refused by
    the client before any of its samples reaches the pipeline; earlier shards pass whole."""
    data_root, shard_root = own_roots
    manifest = load_manifest(shard_root / entity_name)
    good, bad = manifest.shards[0], manifest.shards[1]
    path = shard_root / entity_name / bad.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with LiveServer(settings_for(data_root, shard_root)) as server:
        url = base(server.url, entity_name)
        pipeline = webdataset.DataPipeline(
            webdataset.SimpleShardList([url + good.name, url + bad.name]),
            verified_streams(url, manifest, retries=0),
            webdataset.tarfile_to_samples(),
        )
        keys = []
        with pytest.raises(IntegrityError, match=bad.name):
            for sample in pipeline:
                keys.append(sample["__key__"])
    assert len(keys) == good.num_samples


@pytest.mark.parametrize("verified", [False, True], ids=["plain", "verified"])
def test_webdataset_over_http_gets_every_sample(
    session_server, synthetic, entity_name, entity_cache, verified
):
    """Pins that every sample of every shard arrives over HTTP, member bytes equal to the source
    files: plain WebDataset (curl) and the verified pipeline of shards.remote."""
    url = base(session_server.url, entity_name)
    manifest = open_manifest(url + "manifest.json")
    assert manifest.to_dict() == synthetic.to_dict()
    urls = [url + shard.name for shard in manifest.shards]
    if verified:
        dataset = webdataset.DataPipeline(
            webdataset.SimpleShardList(urls), verified_streams(url, manifest), webdataset.tarfile_to_samples()
        )
    else:
        dataset = webdataset.WebDataset(urls, shardshuffle=False)
    samples = {sample["__key__"]: sample for sample in dataset}
    assert len(samples) == manifest.num_samples == 18
    for key, sample in samples.items():
        exp, frame, cam = key.split("/")
        for member, source in MEMBER_SOURCES.items():
            expected = (entity_cache / source.format(exp=exp, frame=frame, cam=cam)).read_bytes()
            assert sample[member] == expected, (key, member)


@pytest.mark.parametrize("photos", [True, False])
def test_photo_shards_stream_from_the_service_as_from_the_folder(entity_cache, tmp_path, photos):
    """Pins ``ingest --photo-shards`` over HTTP: the service serves each photo shard (a manifest
    file like any other), and the trainer's stream from it yields the samples the same stream
    reads from the folder, photo or not, byte for byte."""
    import itertools

    from shards.decode import ALL_FIELDS
    from shards.ingest import ingest
    from trainer.data import ShardSource, ShardStream, Split, select_shards

    shard_root = tmp_path / "shards"
    ingest(entity_cache, shard_root, shard_size=200_000, workers=2, photo_shards=True)
    fields = ALL_FIELDS if photos else tuple(name for name in ALL_FIELDS if name != "photo")
    with LiveServer(settings_for(entity_cache.parent, shard_root)) as server:
        url = f"{base(server.url, entity_cache.name)}manifest.json"
        epochs = []
        for source in (ShardSource(str(shard_root / entity_cache.name)), ShardSource(url)):
            shards, count = select_shards(source.manifest, Split(), "train")
            stream = ShardStream(
                source, shards, count, Split(), "train", 0, 1, 64, fields, seed=1, shuffle_buffer=2
            )
            samples = stream.raw_samples()
            epochs.append(
                [{k: v for k, v in s.items() if k != "__url__"} for s in itertools.islice(samples, count)]
            )
            samples.close()
    assert epochs[0] == epochs[1] and all(("photo.png" in sample) == photos for sample in epochs[1])
