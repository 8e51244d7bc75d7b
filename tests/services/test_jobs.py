"""Ingest and verify jobs over a live server: 202/409, progress, cancel, resume, restart, exclusions,
and completeness that never shows an unpublished shard. RELIABILITY.md rows 19 and 20."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
from service_harness import (
    SHARD_SIZE,
    Gate,
    LiveServer,
    ServerProcess,
    free_port,
    settings_for,
    wait_for,
    wait_job,
)

from shards.layout import EntityLayout
from shards.manifest import load_manifest


@pytest.fixture
def fresh_roots(entity, tmp_path) -> tuple[Path, Path]:
    shard_root = tmp_path / "fresh-shards"
    shard_root.mkdir()
    return entity.parent, shard_root


def test_ingest_conflict_progress_cancel_and_resume(fresh_roots, entity, published_root, monkeypatch):
    """Pins: a second job on a running entity must be 409 (not a second writer); progress must
    count samples, bytes, rate and ETA; cancel must stop it with whole shards published; a new
    job must resume them and end with the same manifest as an uninterrupted ingest."""
    gate = Gate(monkeypatch)
    data_root, shard_root = fresh_roots
    body = {"shard_size": SHARD_SIZE, "workers": 1}
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        started = client.post(f"/api/v1/entities/{entity.name}/ingest", json=body)
        assert started.status_code == 202, started.text
        job = started.json()
        assert started.headers["location"] == f"/api/v1/jobs/{job['id']}" and job["state"] == "running"
        assert client.post(f"/api/v1/entities/{entity.name}/ingest", json=body).status_code == 409
        wait_for(lambda: (shard_root / entity.name / "manifest.json").exists())
        assert client.post(f"/api/v1/entities/{entity.name}/verify").status_code == 409
        assert client.get(f"/api/v1/entities/{entity.name}").json()["ingest_state"] == "running"

        gate.allow(5)
        progress = wait_for(
            lambda: (p := client.get(job["url"]).json()["progress"])["samples_done"] >= 5 and p
        )
        assert progress["samples_total"] == 18 and progress["bytes_done"] > 0
        assert progress["bytes_per_second"] > 0 and progress["eta_seconds"] is not None
        assert progress["shards_done"] >= 1

        cancelled = client.post(f"{job['url']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
        gate.allow(100)
        ended = wait_job(client, job["id"])
        assert ended["state"] == "cancelled"
        assert client.post(f"{job['url']}/cancel").status_code == 200
        partial = load_manifest(shard_root / entity.name)
        assert partial.state == "partial" and 1 <= len(partial.shards) < partial.num_planned_shards
        assert client.get(f"/api/v1/entities/{entity.name}").json()["ingest_state"] == "partial"

        gate.open.set()
        resumed = client.post(f"/api/v1/entities/{entity.name}/ingest", json=body).json()
        finished = wait_job(client, resumed["id"])
        assert finished["state"] == "succeeded", finished
        assert finished["progress"]["shards_resumed"] == len(partial.shards)
        assert client.get(f"/api/v1/entities/{entity.name}").json()["ingest_state"] == "complete"
    complete = load_manifest(shard_root / entity.name)
    assert complete.to_dict() == load_manifest(published_root / entity.name).to_dict()


def test_job_killed_with_the_server_is_interrupted_and_resumes(fresh_roots, entity, published_root, tmp_path):
    """Pins: a job whose server died (kill -9) must be reported 'interrupted' after the restart,
    not 'running' forever, and starting it again must resume and finish with identical shards."""
    data_root, shard_root = fresh_roots
    settings = settings_for(data_root, shard_root)
    port = free_port()
    first = ServerProcess(settings, port, tmp_path / "server.log", sample_delay=0.1).start()
    try:
        import httpx

        with httpx.Client(base_url=first.url, timeout=10) as client:
            job = client.post(
                f"/api/v1/entities/{entity.name}/ingest", json={"shard_size": SHARD_SIZE, "workers": 1}
            ).json()
            assert client.get(job["url"]).json()["state"] == "running"
            # The manifest, not the progress counter: shards_done counts a shard a moment before the
            # manifest listing it is saved, and a kill in between left nothing to resume.
            manifest = shard_root / entity.name / "manifest.json"
            wait_for(lambda: manifest.exists() and load_manifest(manifest.parent).shards)
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    second = ServerProcess(settings, port, tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=second.url, timeout=10) as client:
            record = client.get(job["url"]).json()
            assert record["state"] == "interrupted" and "start it again" in record["error"]
            assert client.get(f"/api/v1/entities/{entity.name}").json()["ingest_state"] == "partial"
            again = client.post(
                f"/api/v1/entities/{entity.name}/ingest", json={"shard_size": SHARD_SIZE, "workers": 1}
            )
            assert again.status_code == 202
            finished = wait_job(client, again.json()["id"])
            assert finished["state"] == "succeeded" and finished["progress"]["shards_resumed"] >= 1
    finally:
        second.stop()
    assert (
        load_manifest(shard_root / entity.name).to_dict()
        == load_manifest(published_root / entity.name).to_dict()
    )


def test_excluded_samples_are_reported_and_ingest_goes_on(fresh_roots, entity):
    """Pins row 19: a corrupt PNG, a missing photo and a short .bin must each exclude their
    samples with the file and the reason in the job's progress, and the ingest must finish."""
    data_root, shard_root = fresh_roots
    layout = EntityLayout(entity)
    frames = [line.split() for line in layout.frame_list.read_text().splitlines() if line.strip()]
    cameras = sorted(path.name for path in layout.photo_dir(frames[0][0], "x").parent.iterdir())
    (exp0, frame0), (exp1, frame1), (exp2, frame2) = frames[0], frames[4], frames[2]
    photo = layout.photo(exp0, cameras[0], frame0)
    data = bytearray(photo.read_bytes())
    data[len(data) // 2] ^= 0xFF
    photo.write_bytes(bytes(data))
    layout.photo(exp1, cameras[1], frame1).unlink()
    layout.mesh_bin(exp2, frame2).write_bytes(b"\0" * 100)
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        job = client.post(f"/api/v1/entities/{entity.name}/ingest", json={"shard_size": SHARD_SIZE}).json()
        ended = wait_job(client, job["id"])
        state = client.get(f"/api/v1/entities/{entity.name}").json()
    assert ended["state"] == "succeeded", ended
    excluded = {item["key"]: item for item in ended["progress"]["excluded"]}
    assert ended["progress"]["num_excluded"] == len(excluded) == 2 + len(cameras)
    assert "CRC" in excluded[f"{exp0}/{frame0}/{cameras[0]}"]["reason"]
    assert excluded[f"{exp0}/{frame0}/{cameras[0]}"]["path"] == str(photo)
    assert "existing file" in excluded[f"{exp1}/{frame1}/{cameras[1]}"]["reason"]
    for camera in cameras:
        assert "bytes" in excluded[f"{exp2}/{frame2}/{camera}"]["reason"]
    assert ended["result"]["num_samples"] == state["num_samples"] == 18 - len(excluded)
    assert state["num_excluded"] == len(excluded) and state["ingest_state"] == "complete"


def test_completeness_during_ingest_and_after_damage(fresh_roots, entity, monkeypatch):
    """Pins row 20: completeness polled during an ingest must never list a shard that is not
    whole under its final name, and after shards are deleted, corrupted or truncated the counts
    must be exact (size at once, sha256 after a verify job)."""
    gate = Gate(monkeypatch)
    data_root, shard_root = fresh_roots
    folder = shard_root / entity.name
    seen, problems, polls = set(), [], 0
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        url = f"/api/v1/entities/{entity.name}/completeness"
        job = client.post(
            f"/api/v1/entities/{entity.name}/ingest", json={"shard_size": SHARD_SIZE, "workers": 2}
        ).json()
        while client.get(job["url"]).json()["state"] == "running":
            gate.allow(1)
            body = client.get(url).json()
            polls += 1
            for shard in (body["shards"] or {}).get("shards", []):
                data = (folder / shard["name"]).read_bytes()
                if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
                    problems.append(shard["name"])
                seen.add(shard["name"])
        shards = client.get(url).json()["shards"]
        seen.update(shard["name"] for shard in shards["shards"])
        assert not problems and polls >= 5 and len(seen) >= 2
        assert shards["num_published"] == shards["num_planned"] == len(seen)
        assert shards["num_unverified"] == len(seen) and shards["verified"]["state"] == "never"
        entries = {entry["name"]: entry for entry in shards["shards"]}
        deleted, flipped, truncated, *_ = sorted(entries)
        (folder / deleted).unlink()
        data = bytearray((folder / flipped).read_bytes())
        data[1000] ^= 0x01
        (folder / flipped).write_bytes(bytes(data))
        with open(folder / truncated, "r+b") as handle:
            handle.truncate(512)
        live = client.get(url).json()["shards"]
        assert (live["num_missing"], live["num_corrupt"], live["num_unverified"]) == (1, 1, len(seen) - 2)

        verify = client.post(f"/api/v1/entities/{entity.name}/verify")
        assert verify.status_code == 202
        assert wait_job(client, verify.json()["id"])["state"] == "succeeded"
        after = client.get(url).json()["shards"]
        states = {shard["name"]: shard["state"] for shard in after["shards"]}
        assert (states[deleted], states[flipped], states[truncated]) == ("missing", "sha256", "size")
        assert after["num_ok"] == len(seen) - 3 and after["num_corrupt"] == 2 and after["num_missing"] == 1
        bad = sum(entries[name]["num_samples"] for name in (deleted, flipped, truncated))
        assert after["num_samples_servable"] == after["num_samples"] - bad
        entity_state = client.get(f"/api/v1/entities/{entity.name}").json()
        assert entity_state["verified"]["state"] == "failed" and entity_state["verified"]["num_bad"] == 3
        assert (
            client.get(f"/api/v1/entities/{entity.name}/{flipped}").status_code == 200
        )  # size is right: served,
        assert (
            client.get(f"/api/v1/entities/{entity.name}/{truncated}").status_code == 409
        )  # the client's sha256 refuses it
        assert client.get("/api/v1/summary").json()["verified_states"] == {"failed": 1}


def test_release_index_and_missing_pages(own_roots, entity):
    """Pins the completeness report: missing items must page without gaps or repeats, and tars
    of the release index whose folders are absent must be named (unknown names listed apart)."""
    data_root, shard_root = own_roots
    layout = EntityLayout(entity)
    expressions = sorted(path.name for path in (entity / "images").iterdir())
    cameras = sorted(path.name for path in (entity / "images" / expressions[0]).iterdir())
    for path in sorted((entity / "images" / expressions[1]).rglob("*.png"))[:4]:
        path.unlink()
    for path in (entity / "images" / expressions[0] / cameras[0]).iterdir():
        path.unlink()
    layout.tex_var.unlink()
    entity_id = entity.name.split("--")[3]
    tars = [
        "metadata.tar",
        f"images--{expressions[0]}_cam{cameras[0]}.tar",
        f"images--{expressions[0]}_cam{cameras[1]}.tar",
        f"unwrapped_uv_1024--{expressions[1]}.tar",
        f"tracked_mesh--{expressions[0]}.tar",
        "audio.tar",
        "../../etc/passwd",
    ]
    index = data_root / ".release" / entity_id / "index.json"
    index.parent.mkdir(parents=True)
    records = [
        {"name": name, "md5": "0" * 32, "selected": True, "state": "extracted", "error": None}
        for name in tars
    ]
    records[-2].update(state="failed", error="md5 mismatch")
    # The shape services.download.index writes (extra keys are ignored).
    index.write_text(json.dumps({"format": "multiface-release-index", "version": 1, "tars": records}))
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        url = f"/api/v1/entities/{entity.name}/completeness"
        full = client.get(url, params={"limit": 1000}).json()
        raw = full["raw"]
        assert raw["num_missing"] == raw["missing"]["total"] == len(raw["missing"]["items"]) == 1 + 4 + 3
        paged = []
        for offset in range(0, raw["num_missing"] + 3, 3):
            page = client.get(url, params={"offset": offset, "limit": 3}).json()["raw"]["missing"]
            assert page["offset"] == offset and page["limit"] == 3
            paged += page["items"]
        assert paged == raw["missing"]["items"]
        assert raw["totals"]["photo"]["num_present"] == raw["totals"]["photo"]["num_expected"] - 7
        assert raw["expressions"][0]["totals"]["photo"]["percent"] < 100
        release = full["release"]
        assert release["index"] == f".release/{entity_id}/index.json" and release["num_tars"] == len(tars)
        assert release["absent"] == [
            "metadata.tar",
            f"images--{expressions[0]}_cam{cameras[0]}.tar",
            "audio.tar",
        ]
        assert release["unknown"] == ["../../etc/passwd"]
        assert release["downloader_states"] == {"extracted": len(tars) - 1, "failed": 1}
        assert release["failed"] == ["audio.tar: md5 mismatch"]
        (index.parent / "index.json").write_text(json.dumps(tars))
        assert client.get(url).json()["release"]["absent"] == release["absent"]
        assert client.get(url, params={"limit": 1001}).status_code == 422
        assert client.get(url, params={"offset": -1}).status_code == 422
        index.write_text("{not json")
        assert "unreadable" in client.get(url).json()["release"]["error"]


def test_job_errors(own_roots, entity, tmp_path):
    """Pins the 4xx answers: unknown job id or entity 404, ingest without raw data 409, verify
    without a manifest 404, and a failed ingest reported 'failed' with the file at fault."""
    data_root, shard_root = own_roots
    (shard_root / "m--20200101--0000--3000--GHS").mkdir()
    (data_root / "m--20200101--0000--4000--GHS").mkdir()
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        assert client.get("/api/v1/jobs/ingest-20250101T000000-00000000").status_code == 404
        assert client.get("/api/v1/jobs/..%2f..%2fetc").status_code == 404
        assert client.post("/api/v1/entities/nope/ingest").status_code == 404
        assert client.post("/api/v1/entities/m--20200101--0000--3000--GHS/ingest").status_code == 409
        assert client.post("/api/v1/entities/m--20200101--0000--4000--GHS/verify").status_code == 404
        job = client.post("/api/v1/entities/m--20200101--0000--4000--GHS/ingest").json()
        failed = wait_job(client, job["id"])
        assert failed["state"] == "failed" and "KRT" in failed["error"]
        state = client.get("/api/v1/entities/m--20200101--0000--4000--GHS").json()
        assert state["ingest_state"] == "failed"
        listed = client.get("/api/v1/jobs", params={"entity": "m--20200101--0000--4000--GHS"}).json()["jobs"]
        assert [item["id"] for item in listed] == [job["id"]]
