"""Tests of ``multiface download`` against a real release server on 127.0.0.1 (no mocked HTTP).

One synthetic entity (3 expressions, one of them a sentence with audio, 2 cameras, 2 frames)
is laid out as the real release: whole-expression tars, per-camera photo tars, metadata.tar,
audio.tar, CHECKSUM and index.html. RELIABILITY rows 11, 17 and 18 are pinned here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from release_server import (
    HOSTILE_KINDS,
    ReleaseServer,
    build_release,
    corrupt_tar,
    download_config,
    hostile_tar,
    write_checksum,
)

from services.download import (
    DEFAULT_BASE_URL,
    ConfigError,
    DownloadConfig,
    DownloadFailed,
    HostileTarError,
    ReleaseFormatError,
    RetryPolicy,
    download_release,
    load_config,
)
from services.download.extract import extract_tar
from services.download.release import build_release as select_release
from services.download.release import parse_checksum
from services.download_cli import register
from shards.synth import synthesize

EXPRESSIONS = [
    "E057_Cheeks_Puffed",
    "E061_Lips_Puffed",
    "SEN_approach_your_interview_with_statuesque_composure",
]
FAST = RetryPolicy(retries=3, backoff=0.01, stall_timeout=10, connect_timeout=5)
MESH_TAR = "tracked_mesh--E057_Cheeks_Puffed.tar"
HOSTILE_REASONS = {
    "dotdot": "climbs out of the destination with '..'",
    "absolute": "is an absolute path",
    "symlink": "is a symbolic link",
    "hardlink": "is a hard link",
    "device": "is a device file",
    "fifo": "is a FIFO",
    "duplicate": "appears twice in the tar",
}
PHOTO_TAR = "images--E057_Cheeks_Puffed.tar"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The entity the release is built from: the shared factory, with a sentence so audio.tar exists."""
    out = tmp_path_factory.mktemp("release-source")
    return synthesize(out, expressions=3, frames=2, cameras=2, photo_size=(32, 24), tex_size=32, seed=1)


@pytest.fixture
def server(tmp_path: Path, source: Path):
    root = tmp_path / "release"
    root.mkdir()
    with ReleaseServer(root) as running:
        running.folder = build_release(
            source, root, running.base_url, per_camera_images=("E061_Lips_Puffed",)
        )
        yield running


def config_for(source: Path, **changes: object) -> dict:
    return download_config(source, list(EXPRESSIONS), **({"audio": True} | changes))


def run(source: Path, server: ReleaseServer, dest: Path, **changes: object):
    return download_release(
        config_for(source, **changes), dest, base_url=server.base_url, workers=3, progress=False, policy=FAST
    )


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def members_of(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as archive:
        return [m.name for m in archive.getmembers() if m.isfile()]


def read_index(dest: Path, source: Path) -> dict:
    return json.loads((dest / ".release" / source.name.split("--")[3] / "index.json").read_text())


# --- the whole download ------------------------------------------------------------------------


def test_download_gives_a_tree_identical_to_the_source(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins: a download through the release layout loses, adds or alters no file (bytes compared)."""
    dest = tmp_path / "dest"
    report = run(source, server, dest)
    assert report.ok and report.entities[0].root == (dest / source.name).resolve()
    assert tree(dest / source.name) == tree(source)
    states = {tar["name"]: tar["state"] for tar in read_index(dest, source)["tars"]}
    assert set(states.values()) == {"extracted"} and len(states) == 12
    assert not (dest / ".release" / source.name.split("--")[3] / "staging").exists()
    assert sorted(p.name for p in dest.iterdir()) == [".release", source.name]


def test_destination_folder_is_created(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins the seed defect: the destination folder (and its parents) was never created."""
    dest = tmp_path / "not" / "yet" / "there"
    run(source, server, dest, image=False, texture=False, mesh=False, audio=False)
    assert (dest / source.name / "KRT").read_bytes() == (source / "KRT").read_bytes()


def test_index_json_lists_every_release_tar_with_its_state(
    source: Path, server: ReleaseServer, tmp_path: Path
):
    """Pins the index.json schema the data service reads: unselected tars stay 'absent', md5 from CHECKSUM."""
    dest = tmp_path / "dest"
    seen: list[tuple[str, str]] = []
    download_release(
        config_for(source, expression=["E057_Cheeks_Puffed"], image=False),
        dest,
        base_url=server.base_url,
        progress=False,
        policy=FAST,
        listener=lambda entity_id, record: seen.append((record.name, record.state)),
    )
    index = read_index(dest, source)
    assert index["base_url"] == server.base_url and index["root"] == source.name
    checksum = parse_checksum((server.folder / "CHECKSUM").read_text(), "CHECKSUM")
    by_name = {tar["name"]: tar for tar in index["tars"]}
    assert set(by_name) == set(checksum)
    assert all(by_name[name]["md5"] == md5 for name, md5 in checksum.items())
    selected = {name for name, tar in by_name.items() if tar["selected"]}
    assert selected == {"metadata.tar", "audio.tar", MESH_TAR, "unwrapped_uv_1024--E057_Cheeks_Puffed.tar"}
    assert all(by_name[name]["state"] == "extracted" for name in selected)
    assert all(
        tar["state"] == "absent" and tar["error"] is None for n, tar in by_name.items() if n not in selected
    )
    assert (MESH_TAR, "verified") in seen and (MESH_TAR, "extracted") in seen


def test_rerun_skips_extracted_tars(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins idempotence: a second run downloads no tar that index.json lists as extracted."""
    dest = tmp_path / "dest"
    run(source, server, dest)
    before = len([r for r in server.requests if r.name.endswith(".tar")])
    run(source, server, dest)
    assert len([r for r in server.requests if r.name.endswith(".tar")]) == before


def test_kept_tars_are_reverified_not_downloaded_again(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins: with keep_tars, a rerun that lost index.json re-checks the kept tars' md5 instead of refetching."""
    dest, config = tmp_path / "dest", config_for(source, image=False, texture=False)
    download_release(config, dest, base_url=server.base_url, progress=False, policy=FAST, keep_tars=True)
    release_dir = dest / ".release" / source.name.split("--")[3]
    assert (release_dir / "tars" / MESH_TAR).read_bytes() == (server.folder / MESH_TAR).read_bytes()
    (release_dir / "index.json").unlink()
    before = len(server.requests)
    download_release(config, dest, base_url=server.base_url, progress=False, policy=FAST, keep_tars=True)
    assert {r.name for r in server.requests[before:]} == {"index.html", "CHECKSUM"}
    assert tree(dest / source.name / "tracked_mesh") == tree(source / "tracked_mesh")


# --- row 17: md5, partial downloads, CHECKSUM --------------------------------------------------


def test_corrupted_tar_is_an_error_naming_it_and_nothing_of_it_is_extracted(
    source: Path, server: ReleaseServer, tmp_path: Path
):
    """Pins the seed defect: a tar failing its md5 was skipped silently; now it fails by name, unextracted."""
    corrupt_tar(server.folder / PHOTO_TAR)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadFailed, match=PHOTO_TAR) as failure:
        run(source, server, dest)
    assert "md5" in str(failure.value)
    [(_, record)] = failure.value.report.failed
    assert record.name == PHOTO_TAR and record.state == "failed"
    for member in members_of(server.folder / PHOTO_TAR):
        assert not (dest / member).exists(), member
    assert (dest / source.name / "tracked_mesh" / "E057_Cheeks_Puffed").is_dir()  # other tars went on
    tars_dir = dest / ".release" / source.name.split("--")[3] / "tars"
    assert not list(tars_dir.glob(f"{PHOTO_TAR}*"))  # the bad bytes are gone, a rerun starts clean
    assert {t["name"]: t["state"] for t in read_index(dest, source)["tars"]}[PHOTO_TAR] == "failed"


def test_dropped_connection_resumes_with_range_and_md5_passes(
    source: Path, server: ReleaseServer, tmp_path: Path
):
    """Pins row 11: a connection closed mid-tar is resumed with Range + If-Range, not restarted."""
    server.drop_after[MESH_TAR] = 10_000
    dest = tmp_path / "dest"
    run(source, server, dest)
    requests = server.requests_for(MESH_TAR)
    assert [r.status for r in requests] == [200, 206]
    assert requests[1].range == "bytes=10000-" and requests[1].if_range is not None
    assert tree(dest / source.name) == tree(source)


def test_stalled_body_times_out_and_resumes(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins row 12: a server that stops sending mid-tar is abandoned after the stall timeout, then resumed."""
    server.stall_after[MESH_TAR] = (10_000, 10.0)
    # 1 s, not less: on a loaded 2-core CI machine a shorter timeout also abandons healthy answers.
    policy = RetryPolicy(retries=3, backoff=0.01, stall_timeout=1.0, connect_timeout=5)
    dest = tmp_path / "dest"
    download_release(
        config_for(source, image=False, texture=False),
        dest,
        base_url=server.base_url,
        progress=False,
        policy=policy,
    )
    requests = server.requests_for(MESH_TAR)
    stalled, resumed = requests[0], requests[-1]
    assert stalled.status == 0  # the client finished while the server was still holding the first answer
    assert (stalled.range, requests[1].range, resumed.status) == (None, "bytes=10000-", 206), requests
    # Any retry in between (a slow but healthy answer cut by the timeout) also resumed with Range.
    assert all(request.range is not None for request in requests[1:]), requests
    assert tree(dest / source.name / "tracked_mesh") == tree(source / "tracked_mesh")


def test_part_left_by_a_killed_run_is_resumed(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins row 17: a .part from a killed run is continued with Range, and the md5 covers the old bytes."""
    dest = tmp_path / "dest"
    tars_dir = dest / ".release" / source.name.split("--")[3] / "tars"
    tars_dir.mkdir(parents=True)
    data = (server.folder / MESH_TAR).read_bytes()
    (tars_dir / f"{MESH_TAR}.part").write_bytes(data[: len(data) // 2])
    run(source, server, dest)
    [request] = server.requests_for(MESH_TAR)
    assert request.range == f"bytes={len(data) // 2}-" and request.status == 206
    assert tree(dest / source.name) == tree(source)


def test_part_with_wrong_bytes_is_downloaded_again_from_the_start(
    source: Path, server: ReleaseServer, tmp_path: Path
):
    """Pins: a resumed tar whose md5 fails is fetched once more from byte 0 instead of failing."""
    dest = tmp_path / "dest"
    tars_dir = dest / ".release" / source.name.split("--")[3] / "tars"
    tars_dir.mkdir(parents=True)
    (tars_dir / f"{MESH_TAR}.part").write_bytes(b"\xff" * 4096)
    run(source, server, dest)
    assert [r.range for r in server.requests_for(MESH_TAR)] == ["bytes=4096-", None]
    assert tree(dest / source.name) == tree(source)


def test_server_errors_are_retried(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins: a 503 on a tar is retried with backoff rather than failing the tar."""
    server.fail_with[MESH_TAR] = 503
    run(source, server, tmp_path / "dest")
    assert [r.status for r in server.requests_for(MESH_TAR)] == [503, 200]


def test_missing_tar_fails_by_name(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins: a linked tar the server answers 404 for is a named failure, not a hang or a silent skip."""
    (server.folder / MESH_TAR).unlink()
    with pytest.raises(DownloadFailed, match=f"{MESH_TAR}.*404"):
        run(source, server, tmp_path / "dest")


@pytest.mark.parametrize(
    "checksum, expected",
    [
        (
            "nothex00000000000000000000000000  metadata.tar\n",
            "line 1: expected '<32 hex digit md5> <tar name>'",
        ),
        ("{md5}  ../metadata.tar\n", "not a plain tar file name"),
        ("{md5}  metadata.tar\n{other}  metadata.tar\n", "line 2: metadata.tar has two different md5"),
        ("{md5}\n", "line 1: expected"),
        ("\n\n", "has no '<md5> <tar name>' line"),
    ],
    ids=["not-hex", "path", "two-md5", "no-name", "empty"],
)
def test_malformed_checksum_is_rejected_before_anything_is_written(
    source: Path, server: ReleaseServer, tmp_path: Path, checksum: str, expected: str
):
    """Pins row 17: a malformed CHECKSUM stops the run before a file or folder is written or a tar fetched."""
    (server.folder / "CHECKSUM").write_text(checksum.format(md5="a" * 32, other="b" * 32))
    dest = tmp_path / "dest"
    with pytest.raises(ReleaseFormatError, match=expected):
        run(source, server, dest)
    assert not dest.exists()
    assert not [r for r in server.requests if r.name.endswith(".tar")]


def test_tar_without_checksum_line_is_never_used(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins: a linked tar with no CHECKSUM line fails by name instead of being extracted unverified."""
    lines = (server.folder / "CHECKSUM").read_text().splitlines()
    (server.folder / "CHECKSUM").write_text("\n".join(line for line in lines if MESH_TAR not in line) + "\n")
    dest = tmp_path / "dest"
    with pytest.raises(DownloadFailed, match=f"{MESH_TAR}: has no line in CHECKSUM"):
        run(source, server, dest)
    assert not (dest / source.name / "tracked_mesh" / "E057_Cheeks_Puffed").exists()
    assert not server.requests_for(MESH_TAR)


# --- row 18: hostile tars ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_tar_is_rejected_and_nothing_is_written_outside_staging(
    source: Path, server: ReleaseServer, tmp_path: Path, kind: str
):
    """Pins row 18: ../, absolute, symlink, hardlink, device, fifo and duplicate members reject the whole tar."""
    outside = tmp_path / "outside" / "escaped.txt"
    outside.parent.mkdir()
    (server.folder / MESH_TAR).write_bytes(hostile_tar(kind, source.name, outside))
    # The tar is exactly what the release says: the md5 passes, so extraction itself must refuse it.
    write_checksum(server.folder)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadFailed, match=MESH_TAR) as failure:
        run(source, server, dest, image=False, texture=False)
    assert HOSTILE_REASONS[kind] in str(failure.value) and "the whole tar is rejected" in str(failure.value)
    assert list(outside.parent.iterdir()) == []
    assert not (dest / source.name / "tracked_mesh" / "good.txt").exists()
    release_dir = dest / ".release" / source.name.split("--")[3]
    assert not (release_dir / "staging").exists()
    assert not (release_dir / "tars").exists()  # the rejected tar is not kept either
    skipped = ("images/", "unwrapped_uv_1024/", "tracked_mesh/E057")
    expected = {k: v for k, v in tree(source).items() if not k.startswith(skipped)}
    assert tree(dest / source.name) == expected  # the other tars still landed, byte for byte


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_tar_writes_nothing_even_to_staging(tmp_path: Path, kind: str):
    """Pins: the member checks run before the staging folder is created, so a rejected tar leaves no byte."""
    root = "m--20180227--0000--6795937--GHS"
    outside = tmp_path / "outside.txt"
    tar_path = tmp_path / "hostile.tar"
    tar_path.write_bytes(hostile_tar(kind, root, outside))
    dest, staging = tmp_path / "dest", tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(HostileTarError, match=HOSTILE_REASONS[kind]):
        extract_tar(tar_path, "hostile.tar", "6795937", dest, staging)
    assert not staging.exists() and list(dest.iterdir()) == [] and not outside.exists()


def test_tar_of_another_entity_is_rejected(source: Path, tmp_path: Path):
    """Pins: a tar whose members sit under another entity's folder is not mixed into this entity."""
    tar_path = tmp_path / "other.tar"
    with tarfile.open(tar_path, "w") as archive:
        archive.add(source / "KRT", arcname="m--20180227--0000--6795937--GHS/KRT")
    with pytest.raises(HostileTarError, match="not under an entity folder"):
        extract_tar(tar_path, "other.tar", "1234567", tmp_path / "dest", tmp_path / "staging")


# --- selection ---------------------------------------------------------------------------------


def test_selection_follows_the_release_names():
    """Pins the seed defects in selection: metadata.tar and audio.tar were never fetched (substring rule);
    GAZ sequences (`GAZ_G2_Wide_eyes_Full-led_14`) stay selected by their prefix; `E01` selects nothing."""
    names = [
        "metadata.tar",
        "audio.tar",
        "images--E057_Cheeks_Puffed_cam400002.tar",
        "images--E0571_Other.tar",
        "unwrapped_uv_1024--GAZ_G2_Wide_eyes_Full-led_14.tar",
        "tracked_mesh--E057_Cheeks_Puffed.tar",
        "notes.tar",
    ]
    links = {name: f"http://x/{name}" for name in names}
    config = DownloadConfig.from_dict(
        config_for(
            Path("m--1--1--6795937--GHS"), expression=["E057_Cheeks_Puffed", "GAZ_G2_Wide_eyes", "E01"]
        )
    )
    release = select_release("6795937", "http://x/index.html", links, {n: "0" * 32 for n in names}, config)
    assert {t.name for t in release.selected} == {
        "metadata.tar",
        "audio.tar",
        "images--E057_Cheeks_Puffed_cam400002.tar",
        "unwrapped_uv_1024--GAZ_G2_Wide_eyes_Full-led_14.tar",
        "tracked_mesh--E057_Cheeks_Puffed.tar",
    }
    camera_tar = next(t for t in release.tars if t.camera)
    assert (camera_tar.asset, camera_tar.expression, camera_tar.camera) == (
        "image",
        "E057_Cheeks_Puffed",
        "400002",
    )
    assert release.unmatched_expressions == ("E01",)


def test_expression_missing_from_the_release_is_warned(source: Path, server: ReleaseServer, tmp_path: Path):
    """Pins: a config expression that selects nothing is reported, not silently ignored."""
    report = run(source, server, tmp_path / "dest", expression=["E057_Cheeks_Puffed", "E999_Nothing"])
    assert any("E999_Nothing" in warning for warning in report.warnings)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"audio": None}, 'missing key "audio"; add "audio": true or false'),
        ({"images": True}, "unknown key 'images'; did you mean \"image\"?"),
        ({"image": "yes"}, '"image" must be true or false'),
        ({"entity": "6795937"}, '"entity" must be a list of strings, e.g. "entity": \\["6795937"\\]'),
        ({"entity": [6795937]}, '"entity" must be a list of strings'),
        ({"entity": []}, "entity: the list is empty"),
        ({"entity": ["../x"]}, "entity: '../x' is not an entity id"),
        ({"expression": []}, "expression: the list is empty, so image, mesh, texture would download nothing"),
        ({"expression": ["E057/../x"]}, "expression: 'E057/../x' is not an expression name"),
        (
            {"image": False, "mesh": False, "texture": False, "metadata": False, "audio": False},
            "selects nothing: all of image, mesh, texture, metadata, audio are false",
        ),
    ],
    ids=[
        "missing",
        "unknown",
        "not-bool",
        "not-list",
        "not-str",
        "no-entity",
        "bad-id",
        "no-expr",
        "bad-expr",
        "nothing",
    ],
)
def test_config_errors_name_the_key_and_the_fix(change: dict, expected: str):
    """Pins: every config mistake is refused with the key, what was expected and how to fix it."""
    data = config_for(Path("m--1--1--6795937--GHS"))
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=expected):
        DownloadConfig.from_dict(data, source="cfg.json")


def test_config_file_errors_name_the_file_and_line(tmp_path: Path):
    """Pins: unreadable or non-JSON config files say which file, where, and what to write."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"entity": ["6795937"],\n "image": tru}')
    with pytest.raises(ConfigError, match=r"broken.json, line 2 column .*not valid JSON"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read the download config"):
        load_config(tmp_path / "absent.json")
    seed_mini = tmp_path / "mini.json"
    seed_mini.write_text(
        json.dumps(config_for(Path("m--1--1--6795937--GHS"), expression=EXPRESSIONS[:2] * 2))
    )
    assert load_config(seed_mini).expressions == tuple(EXPRESSIONS[:2])  # repeats kept once


# --- CLI ---------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="multiface")
    register(top.add_subparsers(dest="command", required=True))
    return top


def test_cli_help_lists_every_flag(capsys: pytest.CaptureFixture):
    """Pins: `multiface download --help` documents --config, --dest, --base-url (seed root) and --workers."""
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["download", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config FILE", "--dest DIR", "--base-url URL", "--workers N"):
        assert flag in " ".join(text.split()), flag
    assert DEFAULT_BASE_URL in "".join(text.split())  # argparse wraps the long URL at its hyphens


def test_cli_downloads_and_reports_failures(
    source: Path, server: ReleaseServer, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """Pins the CLI exit codes: 0 when all tars are extracted, 1 naming a failed tar, 2 for a bad config."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_for(source, image=False, texture=False)))
    argv = ["download", "--config", str(config), "--dest", str(tmp_path / "d"), "--base-url", server.base_url]
    args = parser().parse_args([*argv, "--workers", "2", "--no-progress"])
    assert args.func(args) == 0
    assert "extracted into" in capsys.readouterr().out
    corrupt_tar(server.folder / "tracked_mesh--E061_Lips_Puffed.tar")
    args = parser().parse_args([*argv[:4], str(tmp_path / "d2"), *argv[5:], "--no-progress"])
    assert args.func(args) == 1
    assert "tracked_mesh--E061_Lips_Puffed.tar: md5" in capsys.readouterr().err
    config.write_text("{}")
    assert args.func(args) == 2
    assert 'missing key "entity"' in capsys.readouterr().err


def test_md5_helper_matches_the_release_checksum(server: ReleaseServer):
    """Pins the test server itself: CHECKSUM lines are md5sum's format and match the served bytes."""
    for line in (server.folder / "CHECKSUM").read_text().splitlines():
        md5, name = line.split("  ")
        assert hashlib.md5((server.folder / name).read_bytes()).hexdigest() == md5
