"""Download jobs (``POST /api/v1/downloads``) over a live service and a release server, both on loopback.

The release is built from the shared synthetic entity (:mod:`release_server`); the service's
data root starts empty and the job fills it. No HTTP is mocked.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest
from release_server import ReleaseServer, build_release, corrupt_tar, download_config
from service_harness import ADMIN_TOKEN, READ_TOKEN, LiveServer, settings_for, wait_for, wait_job

MESH_TAR = "tracked_mesh--E057_Cheeks_Puffed.tar"
"""About 2.7 MB: the stall below comes after the downloader has written its first MiB to the .part."""
STALL = (1_500_000, 30.0)
"""Bytes the release server sends of MESH_TAR before it stalls, and for how long."""


def resumed_offset(request) -> int:
    """The first byte a resumed request asked for (``Range: bytes=N-``), checking it was honoured."""
    assert request.status == 206 and request.range.startswith("bytes=") and request.range.endswith("-")
    return int(request.range[len("bytes=") : -1])


def mesh_bytes_written(client, job: dict) -> bool:
    """Whether the job has written a MiB of the mesh tar (the other tars are smaller together)."""
    return client.get(job["url"]).json()["progress"]["bytes_done"] >= 1 << 20


@pytest.fixture
def release(tmp_path: Path, entity_cache: Path):
    root = tmp_path / "release"
    root.mkdir()
    with ReleaseServer(root) as server:
        server.folder = build_release(entity_cache, root, server.base_url)
        yield server


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(data root, shard root), both empty."""
    data_root, shard_root = tmp_path / "data", tmp_path / "shards"
    data_root.mkdir()
    shard_root.mkdir()
    return data_root, shard_root


def config_for(source: Path, **changes: object) -> dict:
    """The reference config selecting every tar of the entity's release (it has no audio)."""
    expressions = sorted(path.name for path in (source / "images").iterdir())
    return download_config(source, expressions, **changes)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def service(roots: tuple[Path, Path], release: ReleaseServer | None, **changes) -> LiveServer:
    base_url = release.base_url if release is not None else None
    return LiveServer(settings_for(*roots, download_base_url=base_url, **changes))


def test_download_job_fills_the_data_root_and_the_entity_shows_complete(roots, release, entity_cache):
    """Pins the job end to end: 202 with Location, progress in tars and bytes, a result naming
    every extracted tar, the entity then listed with its raw folder complete and the release
    index read by completeness, the files byte-identical to the source, and a rerun that skips
    every extracted tar instead of downloading it again."""
    data_root, _ = roots
    num_tars = len(list(release.folder.glob("*.tar")))
    with service(roots, release) as server, server.client() as client:
        started = client.post("/api/v1/downloads", json=config_for(entity_cache))
        assert started.status_code == 202, started.text
        job = started.json()
        assert started.headers["location"] == job["url"] and job["kind"] == "download"
        assert job["entity"] == entity_cache.name.split("--")[3]
        ended = wait_job(client, job["id"])
        assert ended["state"] == "succeeded", ended
        progress = ended["progress"]
        assert progress["tars_done"] == progress["tars_total"] == num_tars and progress["tars_failed"] == 0
        sizes = sum(path.stat().st_size for path in release.folder.glob("*.tar"))
        assert progress["bytes_done"] == progress["bytes_total"] == sizes
        assert progress["bytes_per_second"] > 0 and progress["failed"] == []
        [report] = ended["result"]["entities"]
        assert report["folder"] == entity_cache.name and report["failed"] == []
        assert sorted(report["extracted"]) == sorted(path.name for path in release.folder.glob("*.tar"))

        state = client.get(f"/api/v1/entities/{entity_cache.name}").json()
        assert state["raw_present"] and state["running_job"] is None
        completeness = client.get(f"/api/v1/entities/{entity_cache.name}/completeness").json()
        assert completeness["raw"]["complete"] and completeness["raw"]["num_missing"] == 0
        assert completeness["release"]["absent"] == []
        assert completeness["release"]["downloader_states"] == {"extracted": num_tars}
        listed = client.get("/api/v1/jobs", params={"entity": entity_cache.name}).json()["jobs"]
        assert [item["id"] for item in listed] == [job["id"]]

        requests_before = len(release.requests)
        again = client.post("/api/v1/downloads", json=config_for(entity_cache)).json()
        assert wait_job(client, again["id"])["progress"]["tars_done"] == num_tars
        fetched = [request.name for request in release.requests[requests_before:]]
        assert not any(name.endswith(".tar") for name in fetched), fetched
    assert tree(data_root / entity_cache.name) == tree(entity_cache)


def test_a_corrupted_tar_fails_the_job_naming_it(roots, release, entity_cache):
    """Pins RELIABILITY row 17 through the service: a tar failing its md5 must make the job
    'failed' with the tar named in its error, its progress and its result, nothing of it
    extracted, and every other tar extracted."""
    data_root, _ = roots
    corrupt_tar(release.folder / MESH_TAR)
    with service(roots, release) as server, server.client() as client:
        job = client.post("/api/v1/downloads", json=config_for(entity_cache)).json()
        ended = wait_job(client, job["id"])
    assert ended["state"] == "failed", ended
    assert MESH_TAR in ended["error"] and "md5" in ended["error"]
    assert [(tar["name"], "md5" in tar["error"]) for tar in ended["progress"]["failed"]] == [(MESH_TAR, True)]
    [report] = ended["result"]["entities"]
    assert [tar["name"] for tar in report["failed"]] == [MESH_TAR]
    assert len(report["extracted"]) == report["num_selected"] - 1
    assert not (data_root / entity_cache.name / "tracked_mesh" / "E057_Cheeks_Puffed").exists()
    assert (data_root / entity_cache.name / "tracked_mesh" / "E061_Lips_Puffed").is_dir()


def test_downloads_are_refused_without_a_base_url_and_bad_configs_name_the_key(roots, entity_cache):
    """Pins that the release root never comes from a request: with no MULTIFACE_DOWNLOAD_BASE_URL
    a valid config is 409 saying how to turn downloads on, and no job starts; a malformed config,
    or one that selects nothing, is 422 naming the key."""
    with service(roots, None) as server, server.client() as client:
        refused = client.post("/api/v1/downloads", json=config_for(entity_cache))
        assert refused.status_code == 409 and "MULTIFACE_DOWNLOAD_BASE_URL" in refused.json()["detail"]
        bad = client.post("/api/v1/downloads", json=config_for(entity_cache, entity="7931268"))
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "entity"]
        unknown = client.post("/api/v1/downloads", json=config_for(entity_cache) | {"images": True})
        assert unknown.status_code == 422 and "images" in unknown.json()["detail"][0]["loc"]
        assert client.post("/api/v1/downloads", json=config_for(entity_cache, mesh="yes")).status_code == 422
        nothing = config_for(entity_cache, image=False, mesh=False, texture=False, metadata=False)
        selects_nothing = client.post("/api/v1/downloads", json=nothing)
        assert selects_nothing.status_code == 422 and "selects nothing" in selects_nothing.text
        no_expressions = client.post("/api/v1/downloads", json=config_for(entity_cache, expression=[]))
        assert no_expressions.status_code == 422
        assert no_expressions.json()["detail"][0]["loc"] == ["body", "expression"]
        assert client.get("/api/v1/jobs").json()["jobs"] == []


def test_only_the_admin_token_starts_a_download(roots, release, entity_cache):
    """Pins row 6 for the new route: no token or the read token is 401 (and nothing is
    fetched); the admin token starts the job, and the read token may then watch it."""
    config = config_for(entity_cache, image=False, texture=False, mesh=False)
    with service(roots, release, read_token=READ_TOKEN, admin_token=ADMIN_TOKEN) as server:
        with server.client() as client:
            assert client.post("/api/v1/downloads", json=config).status_code == 401
            read = {"Authorization": f"Bearer {READ_TOKEN}"}
            refused = client.post("/api/v1/downloads", json=config, headers=read)
            assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
            assert release.requests == []
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            started = client.post("/api/v1/downloads", json=config, headers=admin)
            assert started.status_code == 202, started.text
        with server.client(headers=read) as client:
            assert wait_job(client, started.json()["id"])["state"] == "succeeded"


def test_cancel_conflicts_status_page_and_resume(roots, release, entity_cache):
    """Pins that a running download is shown on the status page, refuses a second download of the
    same entity and an ingest of its folder (409 naming the job), stops when cancelled (keeping
    the bytes it had), and that starting it again resumes the tar with Range instead of
    downloading it from the start."""
    release.stall_after[MESH_TAR] = STALL
    config = config_for(entity_cache)
    with service(roots, release, download_workers=1) as server, server.client() as client:
        job = client.post("/api/v1/downloads", json=config).json()
        # Workers=1: the tars listed before the stalled one get extracted, and the entity folder appears.
        wait_for(lambda: mesh_bytes_written(client, job))
        running = wait_for(lambda: (body := client.get(job["url"]).json())["progress"]["tars_done"] and body)
        assert running["state"] == "running"
        page = client.get("/").text
        assert job["id"] in page and f"/ {running['progress']['tars_total']} tars" in page
        second = client.post("/api/v1/downloads", json=config)
        assert second.status_code == 409 and job["id"] in second.json()["detail"]
        ingest = client.post(f"/api/v1/entities/{entity_cache.name}/ingest")
        assert ingest.status_code == 409 and job["id"] in ingest.json()["detail"]

        cancelled = client.post(f"{job['url']}/cancel")
        assert cancelled.status_code == 202
        ended = wait_job(client, job["id"])
        assert ended["state"] == "cancelled" and ended["cancel_requested"]

        again = client.post("/api/v1/downloads", json=config).json()
        assert wait_job(client, again["id"])["state"] == "succeeded"
    stalled, resumed = release.requests_for(MESH_TAR)
    assert stalled.range is None and 1 << 20 <= resumed_offset(resumed) <= STALL[0]


def test_download_interrupted_by_a_restart_resumes(roots, release, entity_cache):
    """Pins that a download running when the service stops is recorded 'interrupted' (not
    'running' forever) and that starting it again after the restart resumes its partial tar."""
    data_root, _ = roots
    release.stall_after[MESH_TAR] = STALL
    config = config_for(entity_cache, image=False, texture=False, metadata=False)
    with service(roots, release) as server, server.client() as client:
        job = client.post("/api/v1/downloads", json=config).json()
        wait_for(lambda: mesh_bytes_written(client, job))
    with service(roots, release) as server, server.client() as client:
        record = client.get(job["url"]).json()
        assert record["state"] == "interrupted" and "again to resume" in record["error"]
        again = client.post("/api/v1/downloads", json=config).json()
        assert wait_job(client, again["id"])["state"] == "succeeded"
    stalled, resumed = release.requests_for(MESH_TAR)
    assert stalled.range is None and 1 << 20 <= resumed_offset(resumed) <= STALL[0]
    mesh = Path("tracked_mesh")
    assert tree(data_root / entity_cache.name / mesh) == tree(entity_cache / mesh)


def test_a_read_only_data_root_is_refused_naming_it(roots, release, entity_cache, tmp_path):
    """Pins that a download into a data root the service cannot write is refused with 409 naming
    the folder and the fix, before anything is fetched (a read-only tmpfs: root bypasses modes)."""
    data_root = tmp_path / "read-only"
    data_root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(data_root)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        if os.access(data_root, os.W_OK):
            pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        with service((data_root, roots[1]), release) as server, server.client() as client:
            refused = client.post("/api/v1/downloads", json=config_for(entity_cache))
    finally:
        subprocess.run(["umount", str(data_root)], capture_output=True)
    assert refused.status_code == 409, refused.text
    assert str(data_root) in refused.json()["detail"] and "writable" in refused.json()["detail"]
    assert release.requests == []


def test_download_job_record_and_locks_on_disk(roots, release, entity_cache):
    """Pins the persisted shape: the record lists, shows and survives like other jobs (kind
    'download', the config in its options) and its lock is per release entity id, free at the end."""
    _, shard_root = roots
    entity_id = entity_cache.name.split("--")[3]
    config = config_for(entity_cache, image=False, texture=False, mesh=False)
    with service(roots, release) as server, server.client() as client:
        job = client.post("/api/v1/downloads", json=config).json()
        wait_job(client, job["id"])
    record = json.loads((shard_root / ".service" / "jobs" / f"{job['id']}.json").read_text())
    assert record["kind"] == "download" and record["state"] == "succeeded"
    assert record["options"]["config"] == config
    with open(shard_root / ".service" / "locks" / "download" / f"{entity_id}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the job still held it
    with service(roots, release) as server, server.client() as client:
        assert client.get(job["url"]).json()["state"] == "succeeded"
        assert [item["id"] for item in client.get("/api/v1/jobs").json()["jobs"]] == [job["id"]]
