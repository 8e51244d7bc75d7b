"""Ingest: synth -> shards -> read back with plain webdataset; atomic, resumable, deterministic,
defects excluded and reported, verify catches corruption."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset

from shards.ingest import ingest
from shards.manifest import MANIFEST_NAME, load_manifest, verify_folder

MEMBER_SOURCES = {
    "photo.png": "images/{exp}/{cam}/{frame}.png",
    "tex.png": "unwrapped_uv_1024/{exp}/{cam}/{frame}.png",
    "avg_tex.png": "unwrapped_uv_1024/{exp}/average/{frame}.png",
    "verts.bin": "tracked_mesh/{exp}/{frame}.bin",
    "transform.txt": "tracked_mesh/{exp}/{frame}_transform.txt",
}


def expected_samples(root: Path) -> set[str]:
    """The reference rule, computed here from the files: listed frame, average and per-view texture."""
    cameras = [line.strip() for line in (root / "KRT").read_text().split("\n\n") if line.strip()]
    cameras = [block.splitlines()[0] for block in cameras]
    keys = set()
    for line in (root / "frame_list.txt").read_text().splitlines():
        if not line.strip():
            continue
        exp, frame = line.split()
        if not (root / f"unwrapped_uv_1024/{exp}/average/{frame}.png").is_file():
            continue
        for cam in cameras:
            if (root / f"unwrapped_uv_1024/{exp}/{cam}/{frame}.png").is_file():
                keys.add(f"{exp}/{frame}/{cam}")
    return keys


def read_back(folder: Path) -> dict[str, dict]:
    """Read every shard with plain webdataset: no project code on the reading side."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    urls = [str(folder / shard["name"]) for shard in manifest["shards"]]
    samples = {}
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = sample
    return samples


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_every_sample_round_trips_byte_for_byte(entity, tmp_path):
    """Pins that ingest loses no sample and alters no byte: plain webdataset reads back every
    expected sample with members identical to the source files."""
    manifest = ingest(entity, tmp_path / "shards", shard_size=200_000, workers=2)
    folder = tmp_path / "shards" / entity.name
    samples = read_back(folder)
    expected = expected_samples(entity)
    assert set(samples) == expected and manifest.num_samples == len(expected) and not manifest.excluded
    assert manifest.state == "complete" and len(manifest.shards) == manifest.num_planned_shards > 1
    krt_blocks = {block.splitlines()[0]: block for block in (entity / "KRT").read_text().split("\n\n") if block.strip()}
    for key, sample in samples.items():
        exp, frame, cam = key.split("/")
        for member, pattern in MEMBER_SOURCES.items():
            assert sample[member] == (entity / pattern.format(exp=exp, cam=cam, frame=frame)).read_bytes(), (key, member)
        assert sample["camera.txt"].decode().strip() == krt_blocks[cam].strip()
        info = json.loads(sample["sample.json"])
        assert (info["expression"], info["frame"], info["camera"]) == (exp, frame, cam)
    for shard in manifest.shards:
        assert len(shard.expressions) == 1, "a shard must never mix expressions"
        data = (folder / shard.name).read_bytes()
        assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
    for entry in manifest.metadata:
        assert (folder / entry.name).stat().st_size == entry.bytes
    assert (folder / "meta/KRT").read_bytes() == (entity / "KRT").read_bytes()


def test_two_ingests_are_byte_identical(entity, tmp_path):
    """Pins determinism: same input, same shard bytes and the same manifest (fixed mtime, owner, order)."""
    ingest(entity, tmp_path / "a", shard_size=150_000, workers=2)
    ingest(entity, tmp_path / "b", shard_size=150_000, workers=1)
    assert file_digests(tmp_path / "a" / entity.name) == file_digests(tmp_path / "b" / entity.name)


def test_rerun_after_kill_gives_the_same_manifest(entity, tmp_path):
    """Pins crash safety: an ingest killed with SIGKILL mid-run leaves no partial file under a final
    name, its manifest lists only whole shards, and a rerun ends byte-identical to a clean ingest."""
    ingest(entity, tmp_path / "clean", shard_size=30_000, workers=1)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "shards.cli", "ingest", str(entity), "--out", str(out), "--shard-size", "30000", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest_path = out / entity.name / MANIFEST_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if manifest_path.is_file() and json.loads(manifest_path.read_text())["shards"]:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = load_manifest(out / entity.name)
    for shard in partial.shards:
        data = (out / entity.name / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256
    ingest(entity, out, shard_size=30_000, workers=1)
    assert file_digests(out / entity.name) == file_digests(tmp_path / "clean" / entity.name)


def test_defects_are_excluded_and_reported(entity, tmp_path):
    """Pins RELIABILITY row 19: corrupt PNG, missing photo, truncated .bin, missing mesh, bad KRT
    block: each sample is excluded with its path and reason, the ingest goes on."""
    frame_list = [line.split() for line in (entity / "frame_list.txt").read_text().splitlines() if line.strip()]
    cameras = [block.splitlines()[0] for block in (entity / "KRT").read_text().split("\n\n") if block.strip()]
    (exp0, frame0), (exp1, frame1) = frame_list[0], frame_list[-1]
    corrupt = entity / f"unwrapped_uv_1024/{exp0}/{cameras[0]}/{frame0}.png"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (entity / f"images/{exp0}/{cameras[1]}/{frame0}.png").unlink()
    truncated = entity / f"tracked_mesh/{exp1}/{frame1}.bin"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    broken_camera = cameras[2]
    krt = (entity / "KRT").read_text().split("\n")
    krt[krt.index(broken_camera) + 1] = "1.0 not-a-number 3.0"
    (entity / "KRT").write_text("\n".join(krt))

    manifest = ingest(entity, tmp_path / "shards", shard_size=100_000)
    reasons = {item.key: (item.path, item.reason) for item in manifest.excluded}
    assert f"{exp0}/{frame0}/{cameras[0]}" in reasons and "CRC" in reasons[f"{exp0}/{frame0}/{cameras[0]}"][1]
    assert reasons[f"{exp0}/{frame0}/{cameras[1]}"][0].endswith(f"images/{exp0}/{cameras[1]}/{frame0}.png")
    assert "existing file" in reasons[f"{exp0}/{frame0}/{cameras[1]}"][1]
    for cam in cameras[:2]:
        assert "bytes" in reasons[f"{exp1}/{frame1}/{cam}"][1]
    broken = [key for key in reasons if key.endswith(f"/{broken_camera}")]
    assert len(broken) == sum(1 for key in expected_samples(entity) if key.endswith(f"/{broken_camera}"))
    assert all(reasons[key][0].endswith("KRT") for key in broken)
    samples = read_back(tmp_path / "shards" / entity.name)
    assert set(samples) == expected_samples(entity) - set(reasons)
    assert manifest.num_samples + len(reasons) == len(expected_samples(entity))


def test_defect_injectors_exclude_samples(entity, tmp_path):
    """Pins that the synth defect injectors produce holes ingest reports rather than crashes."""
    from shards.synth import defects

    changed = defects.corrupt_png(entity, seed=1)
    changed += defects.truncate_bin(entity, seed=2)
    manifest = ingest(entity, tmp_path / "shards", shard_size=100_000)
    assert manifest.excluded and manifest.state == "complete"
    paths = {item.path for item in manifest.excluded}
    assert any(str(path) in paths for path in changed)


def test_verify_names_corrupt_and_missing_shards(entity, tmp_path):
    """Pins RELIABILITY row 14: a bit flip or a deleted shard is reported by verify (non-zero exit)."""
    manifest = ingest(entity, tmp_path / "shards", shard_size=100_000)
    folder = tmp_path / "shards" / entity.name
    cli = [sys.executable, "-m", "shards.cli", "verify", str(folder)]
    assert subprocess.run(cli, capture_output=True, text=True).returncode == 0
    first, second = manifest.shards[0], manifest.shards[1]
    data = bytearray((folder / first.name).read_bytes())
    data[700] ^= 0x01
    (folder / first.name).write_bytes(bytes(data))
    (folder / second.name).unlink()
    result = subprocess.run(cli, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"SHA256  {first.name}" in result.stdout and f"MISSING {second.name}" in result.stdout


def test_cli_ingest_and_status(entity, tmp_path):
    """Pins the command line: ingest prints the manifest path and counts; status prints the scan."""
    result = subprocess.run(
        [sys.executable, "-m", "shards.cli", "ingest", str(entity), "--out", str(tmp_path), "--shard-size", "1MB"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert f"{entity.name}/manifest.json" in result.stdout and "0 excluded" in result.stdout
    status = subprocess.run([sys.executable, "-m", "shards.cli", "status", str(entity)], capture_output=True, text=True)
    assert status.returncode == 0 and entity.name in status.stdout
    bad = subprocess.run([sys.executable, "-m", "shards.cli", "ingest", str(entity), "--out", str(tmp_path), "--shard-size", "lots"], capture_output=True, text=True)
    assert bad.returncode == 2 and "lots" in bad.stderr


def test_missing_metadata_stops_with_the_file_named(entity, tmp_path):
    """Pins that a missing statistics file stops ingest with the file named, before any shard."""
    (entity / "tex_var.txt").unlink()
    with pytest.raises(Exception, match="tex_var.txt"):
        ingest(entity, tmp_path / "shards")
    assert not list((tmp_path / "shards" / entity.name / "shards").glob("*.tar"))


def test_photo_shards_split_each_sample_and_verify(entity_cache, tmp_path):
    """Pins ``--photo-shards``: each shard's photos go to ``<shard>.photo.tar`` with the same keys
    in the same order, the shard keeps every other member, the two together are byte-for-byte the
    single-shard ingest's samples, the manifest lists and hashes both (served, verified), and a
    manifest without photo shards keeps its earlier bytes (no new keys)."""
    plain = ingest(entity_cache, tmp_path / "plain", shard_size=200_000, workers=2)
    split = ingest(entity_cache, tmp_path / "split", shard_size=200_000, workers=2, photo_shards=True)
    folder = tmp_path / "split" / entity_cache.name
    assert split.photo_shards and all(shard.photos is not None for shard in split.shards)
    assert [shard.name for shard in split.shards] == [shard.name for shard in plain.shards]
    whole = read_back(tmp_path / "plain" / entity_cache.name)
    rest = read_back(folder)
    photo_urls = [str(folder / shard.photos.name) for shard in split.shards]
    photos = {sample["__key__"]: sample for sample in webdataset.WebDataset(photo_urls, shardshuffle=False)}
    assert set(rest) == set(photos) == set(whole)
    for key, sample in whole.items():
        assert "photo.png" not in rest[key] and {name for name in photos[key] if not name.startswith("__")} == {"photo.png"}
        assert photos[key]["photo.png"] == sample["photo.png"]
        assert all(rest[key][name] == value for name, value in sample.items() if name.endswith((".png", ".bin", ".txt", ".json")) and name != "photo.png")
    for shard in split.shards:
        data = (folder / shard.photos.name).read_bytes()
        assert shard.photos.name == shard.name.replace(".tar", ".photo.tar")
        assert len(data) == shard.photos.bytes and hashlib.sha256(data).hexdigest() == shard.photos.sha256
        assert shard.photos.name in split.files()
    assert load_manifest(folder) == split
    assert "photo" not in (tmp_path / "plain" / entity_cache.name / MANIFEST_NAME).read_text()
    assert verify_folder(folder).ok


def test_a_damaged_photo_shard_is_reported_and_rewritten_on_rerun(entity_cache, tmp_path):
    """Pins resume and verify for photo shards: a flipped byte in a companion makes verify name it,
    and a re-run rewrites it back to the published bytes."""
    manifest = ingest(entity_cache, tmp_path, shard_size=200_000, workers=2, photo_shards=True)
    folder = tmp_path / entity_cache.name
    target = manifest.shards[0].photos
    before = file_digests(folder)
    data = bytearray((folder / target.name).read_bytes())
    data[600] ^= 0x01
    (folder / target.name).write_bytes(bytes(data))
    report = verify_folder(folder)
    assert [(problem.name, problem.problem) for problem in report.problems] == [(target.name, "sha256")]
    again = ingest(entity_cache, tmp_path, shard_size=200_000, workers=2, photo_shards=True)
    assert again == manifest and file_digests(folder) == before


def test_cli_ingest_photo_shards(entity_cache, tmp_path):
    """Pins the command line flag: ``--photo-shards`` reaches ingest (the manifest says so and
    every shard has its photo shard)."""
    result = subprocess.run(
        [sys.executable, "-m", "shards.cli", "ingest", str(entity_cache), "--out", str(tmp_path), "--photo-shards"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / entity_cache.name)
    assert manifest.photo_shards and all(shard.photos is not None for shard in manifest.shards)
