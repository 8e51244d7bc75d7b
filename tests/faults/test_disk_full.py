"""Disk full during ingest: RELIABILITY.md row 16.

The shard root is a small tmpfs mounted by the test (``mount -t tmpfs -o size=...``; skipped with
the reason where mounting is not permitted, always unmounted). A filler file leaves a chosen
amount of free space; the ingest must fail cleanly (non-zero exit, an error naming the problem),
publish nothing partial and keep no temp file; once the filler is removed, the rerun completes
byte-identical to a clean ingest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_harness import Gate, LiveServer, settings_for, wait_for
from shard_checks import assert_identical, check_folder, run_cli_ingest

from shards.ingest import ingest
from shards.writer import is_temp_name

SHARD_SIZE = 250_000
PAGE = 4096


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k,mode=0755", "tmpfs", str(path)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip(
            "no mount command here; the disk-full tests need 'mount -t tmpfs' (root or CAP_SYS_ADMIN)"
        )
    except subprocess.CalledProcessError as error:
        pytest.skip(
            f"'mount -t tmpfs' is not permitted here ({error.stderr.strip() or error.returncode}); "
            "the disk-full tests need root or CAP_SYS_ADMIN"
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file (real pages: tmpfs does not count holes) leaving ``leave`` bytes free."""
    filler = disk / "filler"
    remaining = max(0, free_bytes(disk) - leave)
    block = bytes(1 << 20)
    with open(filler, "wb") as handle:
        while remaining > 0:
            remaining -= handle.write(block[: min(len(block), remaining)])
    return filler


def used_bytes(folder: Path) -> int:
    """Space the files take on tmpfs (whole pages)."""
    return sum(-(-path.stat().st_size // PAGE) * PAGE for path in folder.rglob("*") if path.is_file())


def temp_files(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if is_temp_name(path.name)]


@pytest.fixture(scope="module")
def clean(entity_cache, tmp_path_factory) -> Path:
    """An uninterrupted ingest of the small entity on an ordinary disk."""
    root = tmp_path_factory.mktemp("clean")
    ingest(entity_cache, root, shard_size=SHARD_SIZE, workers=2)
    return root / entity_cache.name


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9], ids=["in-metadata", "mid-shards", "near-the-end"])
def test_disk_full_fails_cleanly_and_resumes(entity_cache, clean, tmp_path, fraction, figure):
    """Pins row 16: with the disk full at the metadata, in the middle of the shards or near the
    end, the CLI must exit non-zero naming 'No space left on device', leave no temp file (a
    failed close used to keep the half-written shard and its space), list only whole shards and
    put nothing partial under a final name; after space is freed the rerun must complete
    byte-identical to a clean ingest."""
    needed = used_bytes(clean)
    with small_disk(tmp_path / "disk", 2 * needed + 64 * PAGE) as disk:
        filler = fill(disk, int(fraction * needed))
        root = disk / "shards"
        failed = run_cli_ingest(entity_cache, root, SHARD_SIZE)
        assert failed.returncode == 1, (failed.returncode, failed.stderr[-2000:])
        assert "ingest failed:" in failed.stderr and "No space left on device" in failed.stderr
        assert temp_files(disk) == []
        folder = root / entity_cache.name
        state = check_folder(folder, clean)
        assert state.manifest_state != "complete"
        filler.unlink()
        rerun = run_cli_ingest(entity_cache, root, SHARD_SIZE)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert_identical(folder, clean)
    figure(f"disk_full.{fraction}.shards_listed_at_failure", state.num_listed)
    figure(f"disk_full.{fraction}.outcome", "failed-clean,resumed-identical")


def test_disk_full_ingest_job_fails_and_is_reported(entity_cache, clean, tmp_path, figure):
    """Pins row 16 through the service: an ingest job on a full shard root must end 'failed'
    with the ENOSPC error in its record and the entity's state, list no partial shard in
    completeness, keep no temp file, and a new job after space is freed must succeed with
    byte-identical shards (the job's lock must not stay held)."""
    needed = used_bytes(clean)
    with small_disk(tmp_path / "disk", 2 * needed + 64 * PAGE) as disk:
        root = disk / "shards"
        root.mkdir()
        filler = fill(disk, needed // 2)
        body = {"shard_size": SHARD_SIZE, "workers": 2}
        with LiveServer(settings_for(entity_cache.parent, root)) as server, server.client() as client:
            job = client.post(f"/api/v1/entities/{entity_cache.name}/ingest", json=body).json()
            ended = _wait_job(client, job["url"])
            assert ended["state"] == "failed", ended
            assert "No space left on device" in ended["error"]
            entity = client.get(f"/api/v1/entities/{entity_cache.name}").json()
            assert entity["ingest_state"] == "failed"
            completeness = client.get(f"/api/v1/entities/{entity_cache.name}/completeness").json()
            listed = (completeness["shards"] or {}).get("shards", [])
            assert temp_files(disk) == []
            state = check_folder(root / entity_cache.name, clean)
            assert len(listed) == state.num_listed
            filler.unlink()
            again = client.post(f"/api/v1/entities/{entity_cache.name}/ingest", json=body)
            assert again.status_code == 202, again.text
            finished = _wait_job(client, again.json()["url"])
            assert finished["state"] == "succeeded", finished
        folder = root / entity_cache.name
        shutil.rmtree(root / ".service")
        assert_identical(folder, clean)
    figure("disk_full.job.outcome", "failed-reported,resumed-identical")


def _wait_job(client, url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(url).json()
        if record["state"] != "running":
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {url} still running after {timeout} s")


def test_job_start_on_a_full_disk_names_the_problem(entity_cache, tmp_path):
    """Pins row 16 at the API: starting a job when the shard root has no space left must be
    refused with 507 and a detail naming 'No space left on device' and the folder, not a bare
    500, and must leave the entity's lock free (a job starts once space is freed)."""
    with small_disk(tmp_path / "disk", 256 * PAGE) as disk:
        root = disk / "shards"
        root.mkdir()
        with LiveServer(settings_for(entity_cache.parent, root)) as server, server.client() as client:
            filler = fill(disk, 0)
            url = f"/api/v1/entities/{entity_cache.name}/ingest"
            response = client.post(url, json={"shard_size": SHARD_SIZE})
            filler.unlink()
            job = client.post(url, json={"shard_size": SHARD_SIZE})
            assert job.status_code == 202, job.text
            _wait_job(client, job.json()["url"])
    assert response.status_code == 507 and "No space left on device" in response.text, (
        response.status_code,
        response.text[:300],
    )
    assert response.json()["error"] == "InsufficientStorage"
    assert str(root / ".service" / "jobs") in response.json()["detail"]


def test_job_whose_final_record_cannot_be_written_does_not_stay_running(entity_cache, tmp_path, monkeypatch):
    """Pins row 16 at the end of a job: when the disk fills up while an ingest runs, so that the
    job fails and its final record cannot be written either, the job used to stay 'running' for
    ever with its lock held. Now this server must answer the terminal state with both errors,
    free the lock (a new job is refused for the full disk, 507, not as a conflict), the record
    left on disk must read 'interrupted' to a server that does not have the job in memory, and
    once space is freed the true final record must be written."""
    gate = Gate(monkeypatch)
    with small_disk(tmp_path / "disk", 8 << 20) as disk:
        root = disk / "shards"
        root.mkdir()
        url = f"/api/v1/entities/{entity_cache.name}/ingest"
        settings = settings_for(entity_cache.parent, root)
        with LiveServer(settings) as server, server.client() as client:
            job = client.post(url, json={"shard_size": SHARD_SIZE, "workers": 1}).json()
            assert gate.waiting.wait(20), "the ingest never reached its first sample"
            filler = fill(disk, 0)
            gate.open.set()
            assert _wait_job(client, job["url"])["state"] == "failed"
            # After its retries (about 2 s) the job's error also says its record was not written.
            note = "final record could not be written"
            ended = wait_for(lambda: note in (body := client.get(job["url"]).json())["error"] and body)
            assert ended["state"] == "failed" and ended["error"].count("No space left on device") == 2
            again = client.post(url, json={"shard_size": SHARD_SIZE})
            assert again.status_code == 507, again.text
            record_file = root / ".service" / "jobs" / f"{job['id']}.json"
            assert json.loads(record_file.read_text())["state"] == "running"
            with LiveServer(settings) as other, other.client() as other_client:
                assert other_client.get(job["url"]).json()["state"] == "interrupted"
            filler.unlink()
            assert client.get(job["url"]).json()["state"] == "failed"
            assert json.loads(record_file.read_text())["state"] == "failed"


def test_checkpoint_on_a_full_disk_keeps_no_temp_file(tmp_path):
    """Pins row 16 for the trainer: a checkpoint save that runs out of space must raise and leave
    the previous checkpoint whole and no temp file behind (it used to keep the half-written
    checkpoint-sized temp, and each restarted rank has a new pid, so they piled up)."""
    import torch

    from trainer.checkpointing import CHECKPOINT, save_checkpoint

    with small_disk(tmp_path / "disk", 64 * PAGE) as disk:
        small = {"weights": torch.zeros(1000)}
        save_checkpoint(disk, small, "{}")
        # torch.save reports ENOSPC as the context of a RuntimeError from its zip writer.
        with pytest.raises((OSError, RuntimeError)) as raised:
            save_checkpoint(disk, {"weights": torch.zeros(1 << 20)}, "{}")
        chain = [raised.value, raised.value.__context__, raised.value.__cause__]
        assert any(isinstance(error, OSError) and error.errno == errno.ENOSPC for error in chain), chain
        assert temp_files(disk) == []
        assert torch.equal(torch.load(disk / CHECKPOINT, weights_only=False)["weights"], small["weights"])
