"""What a reader may find in a shard folder at any instant, checked against an uninterrupted ingest.

Used by the kill -9 and disk-full tests: ``check_folder`` is the "nothing partial under a final
name, the manifest lists only whole shards" invariant, ``assert_identical`` the "rerun gives
byte-identical shards" one, and ``samples_out`` / ``expected_samples`` count samples in and out
independently of the ingest code.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.manifest import MANIFEST_NAME, load_manifest
from shards.writer import is_temp_name

ROOT = Path(__file__).resolve().parents[2]
LOCK_NAME = ".ingest.lock"


def ingest_command(entity: Path, out: Path, shard_size: int, workers: int = 2) -> list[str]:
    """The CLI ingest, as an operator runs it."""
    return [
        sys.executable, "-m", "shards.cli", "ingest", str(entity), "--out", str(out),
        "--shard-size", str(shard_size), "--workers", str(workers),
    ]  # fmt: skip


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_cli_ingest(
    entity: Path, out: Path, shard_size: int, timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ingest_command(entity, out, shard_size),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` by relative path (the lock file included: it is empty)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def expected_samples(entity: Path) -> set[str]:
    """Sample keys of the raw entity from its frame list and KRT, without the ingest's own code."""
    frames = [line.split() for line in (entity / "frame_list.txt").read_text().splitlines() if line.strip()]
    blocks = [block for block in (entity / "KRT").read_text().split("\n\n") if block.strip()]
    cameras = [block.splitlines()[0].strip() for block in blocks]
    return {f"{expression}/{frame}/{camera}" for expression, frame in frames for camera in cameras}


def sample_keys(path: Path) -> list[str]:
    """Distinct sample keys of a tar shard, in order (member name up to the first dot)."""
    keys: list[str] = []
    with tarfile.open(path) as archive:
        for member in archive:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def samples_out(folder: Path) -> list[str]:
    """Every sample key in the shards the manifest lists (duplicates kept, to be counted)."""
    manifest = load_manifest(folder)
    return [key for entry in manifest.shards for key in sample_keys(folder / entry.name)]


@dataclass
class FolderState:
    """What one look at a shard folder found."""

    manifest_state: str  # "none", "partial" or "complete"
    num_listed: int = 0
    num_temp: int = 0
    num_unlisted_whole: int = 0


def check_folder(folder: Path, clean: Path) -> FolderState:
    """Assert the crash-safety invariant of ``folder`` against the uninterrupted ingest ``clean``.

    - the manifest, if any, parses and every file it lists has its size and sha256, and the
      entry equals the clean ingest's entry of that name;
    - every other file under a final name (not a temp name) in ``shards/`` and ``meta/`` is
      byte-identical to the clean ingest's file of that name: whole, only not yet listed;
    - nothing else lies in the entity folder.
    """
    clean_digests = file_digests(clean)
    clean_manifest = load_manifest(clean)
    clean_entries = {entry.name: entry for entry in clean_manifest.files().values()}
    state = FolderState("none")
    listed: set[str] = set()
    if (folder / MANIFEST_NAME).exists():
        manifest = load_manifest(folder)  # a half-written manifest would raise here
        state.manifest_state = manifest.state
        for name, entry in manifest.files().items():
            data = (folder / name).read_bytes()
            assert len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256, (
                f"{name}: listed in the manifest but not whole"
            )
            assert entry == clean_entries[name], (
                f"{name}: listed with an entry the clean ingest does not have"
            )
        listed = {entry.name for entry in manifest.shards}
        state.num_listed = len(listed)
        assert manifest.num_samples == sum(len(sample_keys(folder / name)) for name in listed)
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(folder))
        if is_temp_name(path.name):
            state.num_temp += 1
            continue
        assert name in clean_digests, f"{name}: a file the clean ingest does not have"
        if name in (MANIFEST_NAME, LOCK_NAME):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == clean_digests[name], f"{name}: a partial or different file under a final name"
        if name.startswith("shards/") and name not in listed:
            state.num_unlisted_whole += 1
    return state


def assert_identical(folder: Path, clean: Path) -> None:
    """Every file (shards, metadata, manifest) byte-identical to the clean ingest, none more or less."""
    got, want = file_digests(folder), file_digests(clean)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"differ from the clean ingest: {different}"
