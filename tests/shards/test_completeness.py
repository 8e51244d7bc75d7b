"""Tests of the completeness scan: exact counts, missing items and trainable samples on hand-built trees.

Trees are built by hand in the real layout (not with ``shards.synth``) so that every hole is
known: metadata files are tiny but real, images and meshes are empty since the scan only lists.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.completeness import (
    MISSING_KINDS,
    MissingItem,
    Tally,
    format_report,
    scan_entity,
)
from shards.formats import read_frame_list, read_krt
from shards.layout import NUM_VERTICES, EntityLayout
from shards.samples import enumerate_samples, index_entity

ENTITY = "m--20180227--0000--6795937--GHS"
CAMERAS = ("400002", "400004", "400007")
PUFF, SENTENCE = "E057_Cheeks_Puffed", "SEN_the_quick_brown_fox"
FRAMES = {PUFF: ("000100", "000101", "000102"), SENTENCE: ("000200", "000201")}


def _krt(cameras: tuple[str, ...]) -> str:
    block = "{}\n1000 0 667\n0 1000 1024\n0 0 1\n0 0 0 0 0\n1 0 0 0\n0 1 0 0\n0 0 1 1000\n\n"
    return "".join(block.format(camera) for camera in cameras)


def _png(height: int = 4, width: int = 4) -> bytes:
    data = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(data, format="PNG")
    return data.getvalue()


def make_entity(parent: Path, frames: dict[str, tuple[str, ...]] = FRAMES, cameras=CAMERAS) -> Path:
    """A complete entity: real metadata, empty photos, textures, meshes and audio."""
    root = parent / ENTITY
    layout = EntityLayout(root)
    root.mkdir(parents=True)
    layout.krt.write_text(_krt(cameras))
    layout.frame_list.write_text("".join(f"{e} {f}\n" for e, listed in frames.items() for f in listed))
    layout.tex_mean.write_bytes(_png())
    layout.tex_var.write_text("2500.0\n")
    layout.vert_mean.write_bytes(np.zeros(NUM_VERTICES * 3, np.float32).tobytes())
    layout.vert_var.write_text("1.5\n")
    for expression, listed in frames.items():
        paths = [layout.mesh_bin, layout.mesh_obj, layout.transform, layout.average_texture]
        files = [path(expression, frame) for frame in listed for path in paths]
        files += [
            path(expression, camera, frame)
            for frame in listed
            for camera in cameras
            for path in (layout.photo, layout.texture)
        ]
        if expression.startswith("SEN_"):
            files.append(layout.audio(expression))
        for file in files:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.touch()
    return root


@pytest.fixture
def entity(tmp_path: Path) -> Path:
    return make_entity(tmp_path)


@pytest.fixture
def holed(entity: Path) -> Path:
    """The entity with one hole of each kind (see test_known_holes_are_counted_and_listed_exactly)."""
    layout = EntityLayout(entity)
    layout.photo(PUFF, "400004", "000101").unlink()  # a dropped frame for one camera
    layout.average_texture(PUFF, "000102").unlink()
    layout.mesh_obj(PUFF, "000100").unlink()
    layout.transform(SENTENCE, "000201").unlink()
    shutil.rmtree(layout.photo_dir(SENTENCE, "400007"))  # a camera folder missing
    shutil.rmtree(layout.texture_dir(SENTENCE, "400007"))
    layout.audio(SENTENCE).unlink()
    return entity


def test_complete_entity_has_nothing_missing(entity: Path) -> None:
    """Pins false alarms: a complete tree must report 100 % everywhere and no missing item."""
    report = scan_entity(entity)
    assert report.complete
    assert report.missing == []
    assert (report.entity, report.entity_id, report.root) == (ENTITY, "6795937", str(entity.resolve()))
    assert [status.name for status in report.metadata if status.parseable] == [
        "KRT",
        "frame_list.txt",
        "tex_mean.png",
        "tex_var.txt",
        "vert_mean.bin",
        "vert_var.txt",
    ]
    assert (report.cameras, report.camera_source, report.cameras_not_in_krt) == (list(CAMERAS), "KRT", [])
    assert [expression.expression for expression in report.expressions] == [PUFF, SENTENCE]
    assert all(tally.percent == 100.0 for tally in report.totals().values() if tally.num_expected)
    assert report.num_samples == (3 + 2) * 3
    assert report.num_files == (3 + 2) * (4 + 2 * 3) + 1
    assert report.num_extra_files == 0


def test_known_holes_are_counted_and_listed_exactly(holed: Path) -> None:
    """Pins miscounting: each hole (dropped photo, missing average, .obj, transform, camera folder,
    audio) must show up in its own asset's count, percentage and missing list, and nowhere else."""
    report = scan_entity(holed)
    puff, sentence = report.expressions
    assert "audio" not in puff.assets and sentence.assets["audio"].num_present == 0

    assert {kind: (t.num_present, t.num_expected, t.percent) for kind, t in puff.totals().items()} == {
        "mesh_bin": (3, 3, 100.0),
        "mesh_obj": (2, 3, 66.66),
        "transform": (3, 3, 100.0),
        "average_texture": (2, 3, 66.66),
        "photo": (8, 9, 88.88),
        "texture": (9, 9, 100.0),
        "all": (27, 30, 90.0),
    }
    assert {kind: (t.num_present, t.num_expected, t.percent) for kind, t in sentence.totals().items()} == {
        "mesh_bin": (2, 2, 100.0),
        "mesh_obj": (2, 2, 100.0),
        "transform": (1, 2, 50.0),
        "average_texture": (2, 2, 100.0),
        "audio": (0, 1, 0.0),
        "photo": (4, 6, 66.66),
        "texture": (4, 6, 66.66),
        "all": (15, 21, 71.42),
    }
    assert [(c.camera, c.photo.missing_frames) for c in puff.cameras] == [
        ("400002", ()),
        ("400004", ("000101",)),
        ("400007", ()),
    ]
    # Frame 000102 of the puff has no average texture: the reference drops its 3 views; the
    # sentence's camera 400007 has no textures: 2 frames x 2 cameras remain.
    assert (puff.num_samples, sentence.num_samples, report.num_samples) == (6, 4, 10)
    assert not report.complete

    missing = [(item.kind, item.expression, item.camera, item.frame, item.path) for item in report.missing]
    assert missing == [
        ("mesh_obj", PUFF, None, "000100", f"tracked_mesh/{PUFF}/000100.obj"),
        ("average_texture", PUFF, None, "000102", f"unwrapped_uv_1024/{PUFF}/average/000102.png"),
        ("photo", PUFF, "400004", "000101", f"images/{PUFF}/400004/000101.png"),
        ("audio", SENTENCE, None, None, f"audio/{SENTENCE}.wav"),
        ("transform", SENTENCE, None, "000201", f"tracked_mesh/{SENTENCE}/000201_transform.txt"),
        ("photo", SENTENCE, "400007", "000200", f"images/{SENTENCE}/400007/000200.png"),
        ("photo", SENTENCE, "400007", "000201", f"images/{SENTENCE}/400007/000201.png"),
        ("texture", SENTENCE, "400007", "000200", f"unwrapped_uv_1024/{SENTENCE}/400007/000200.png"),
        ("texture", SENTENCE, "400007", "000201", f"unwrapped_uv_1024/{SENTENCE}/400007/000201.png"),
    ]


def test_missing_item_paths_agree_with_the_layout(holed: Path) -> None:
    """Pins drift between the scan's path strings and EntityLayout: a service would send a
    client to download a file that the reader does not look for."""
    layout = EntityLayout(holed.resolve())
    report = scan_entity(holed)
    assert {item.kind for item in report.missing} == set(MISSING_KINDS) - {"mesh_bin", "metadata"}
    for item in report.missing:
        if item.kind == "audio":
            expected = layout.audio(str(item.expression))
        elif item.camera is None:
            expected = getattr(layout, item.kind)(item.expression, item.frame)
        else:
            expected = getattr(layout, item.kind)(item.expression, item.camera, item.frame)
        assert holed.resolve() / item.path == expected
        assert not expected.exists()


def test_trainable_count_matches_enumerate_samples(holed: Path) -> None:
    """Pins the scan's sample count drifting from the rule ingest uses (shards.samples): it
    counts without building SampleKeys, so it must agree with enumerate_samples exactly, also
    with duplicated frame-list lines, unlisted frames and a KRT camera that has no folders."""
    layout = EntityLayout(holed)
    with layout.frame_list.open("a") as frame_list:
        frame_list.write(f"{PUFF} 000100\n{PUFF} 000555\n")
    layout.texture(PUFF, "400002", "000555").parent.mkdir(exist_ok=True)
    layout.texture(PUFF, "400002", "000555").touch()
    layout.krt.write_text(_krt((*CAMERAS, "400010")))
    samples = enumerate_samples(
        read_frame_list(layout.frame_list), list(read_krt(layout.krt)), index_entity(layout)
    )
    report = scan_entity(holed)
    assert report.num_samples == len(samples) == 10 + 3
    assert [e.num_samples for e in report.expressions] == [
        sum(sample.expression == e.expression for sample in samples) for e in report.expressions
    ]


def test_broken_krt_is_reported_and_cameras_come_from_the_listing(holed: Path) -> None:
    """Pins a crash (or silently empty report) on an unparseable KRT: the error is reported,
    cameras fall back to the folders on disk, and no sample counts as trainable."""
    (holed / "KRT").write_text(_krt(CAMERAS).replace("0 1000 1024", "0 one-thousand 1024", 1))
    report = scan_entity(holed)
    krt = report.metadata[0]
    assert (krt.name, krt.present, krt.parseable) == ("KRT", True, False)
    assert "KRT, line 3" in str(krt.error)
    assert (report.cameras, report.camera_source) == (list(CAMERAS), "listing")
    # Camera 400007 is still on disk for the puff, so its missing sentence folder is still found.
    assert [item.path for item in report.missing if item.camera == "400007"] == [
        f"images/{SENTENCE}/400007/000200.png",
        f"images/{SENTENCE}/400007/000201.png",
        f"unwrapped_uv_1024/{SENTENCE}/400007/000200.png",
        f"unwrapped_uv_1024/{SENTENCE}/400007/000201.png",
    ]
    assert report.num_samples == 0
    assert "KRT" in format_report(report) and "UNPARSEABLE" in format_report(report)


def test_unparseable_tex_var_is_reported_not_raised(entity: Path) -> None:
    """Pins a metadata parse error escaping the scan, or being reported as a missing file."""
    (entity / "tex_var.txt").write_text("not a number\n")
    report = scan_entity(entity)
    status = {status.name: status for status in report.metadata}["tex_var.txt"]
    assert (status.present, status.parseable) == (True, False)
    assert str(status.error).startswith("tex_var.txt, line 1: expected one number")
    assert [s.name for s in report.metadata if not s.parseable] == ["tex_var.txt"]
    assert report.missing == [] and not report.complete
    assert report.num_samples == 15


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("tex_mean.png", b"\x89PNG\r\n\x1a\n truncated", "tex_mean.png: expected a complete PNG"),
        ("vert_mean.bin", b"\0" * 12, "vert_mean.bin: expected 87672 bytes"),
        ("frame_list.txt", b"E057_Cheeks_Puffed 12\n", "frame_list.txt, line 1: expected"),
        ("vert_var.txt", b"-1\n", "vert_var.txt: expected a positive finite variance"),
        ("KRT", b"\xff\xfe", "KRT: UnicodeDecodeError"),
    ],
)
def test_each_metadata_file_is_checked_by_its_parser(
    entity: Path, name: str, content: bytes, expected: str
) -> None:
    """Pins a metadata file accepted without parsing (or parsed by the wrong parser)."""
    (entity / name).write_bytes(content)
    status = {status.name: status for status in scan_entity(entity).metadata}[name]
    assert (status.present, status.parseable) == (True, False)
    assert str(status.error).startswith(expected)


def test_missing_metadata_file_is_a_missing_item(entity: Path) -> None:
    """Pins a missing metadata file reported as unparseable only, not in the missing list."""
    (entity / "vert_mean.bin").unlink()
    report = scan_entity(entity)
    assert report.missing == [MissingItem("metadata", None, None, None, "vert_mean.bin")]
    status = report.metadata[4]
    assert (status.name, status.present, status.parseable) == ("vert_mean.bin", False, False)


def test_missing_frame_list_expects_nothing_and_counts_everything_extra(entity: Path) -> None:
    """Pins a crash without frame_list.txt: expressions still come from disk, nothing is
    expected, every file is extra and no sample is trainable (the reference reads the list)."""
    (entity / "frame_list.txt").unlink()
    report = scan_entity(entity)
    assert report.frame_list_error == "frame_list.txt: missing"
    assert [(e.expression, e.in_frame_list, e.num_frames) for e in report.expressions] == [
        (PUFF, False, 0),
        (SENTENCE, False, 0),
    ]
    assert report.num_samples == 0
    assert report.num_extra_files == report.num_files - 1  # all but the audio file
    assert [item.path for item in report.missing] == ["frame_list.txt"]


def test_camera_on_disk_but_not_in_krt_is_flagged(entity: Path) -> None:
    """Pins cameras outside the KRT going unnoticed, or being counted as expected."""
    layout = EntityLayout(entity)
    layout.photo_dir(PUFF, "400099").mkdir()
    layout.photo(PUFF, "400099", "000100").touch()
    layout.photo(PUFF, "400099", "000999").touch()
    report = scan_entity(entity)
    assert report.cameras_not_in_krt == ["400099"]
    assert report.cameras == list(CAMERAS)
    assert report.missing == []
    assert report.expressions[0].num_extra_files == 1  # frame 000999 is not listed
    assert "on disk but not in KRT: 400099" in format_report(report)


def test_extra_files_and_expressions_only_on_disk(entity: Path) -> None:
    """Pins unlisted files counted as present, and expressions missing from the frame list
    being dropped from the report or expected to be complete."""
    layout = EntityLayout(entity)
    layout.photo(PUFF, "400002", "000999").touch()
    layout.mesh_dir("EXP_unlisted").mkdir()
    layout.mesh_bin("EXP_unlisted", "000001").touch()
    layout.mesh_obj("EXP_unlisted", "000001").touch()
    report = scan_entity(entity)
    puff, _, unlisted = report.expressions
    assert (puff.num_extra_files, puff.totals()["photo"].num_present) == (1, 9)
    assert (unlisted.expression, unlisted.in_frame_list, unlisted.num_frames) == ("EXP_unlisted", False, 0)
    assert (unlisted.num_extra_files, unlisted.totals()["all"].percent) == (2, None)
    assert report.num_extra_files == 3 and report.complete
    assert "EXP_unlisted *" in format_report(report)


def test_empty_folder_is_reported_not_raised(tmp_path: Path) -> None:
    """Pins a crash on an entity folder with nothing in it (or with a non-Multiface name)."""
    report = scan_entity(tmp_path)
    assert report.entity_id is None
    assert [item.path for item in report.missing] == [status.name for status in report.metadata]
    assert (report.expressions, report.cameras, report.num_samples) == ([], [], 0)
    format_report(report)
    json.dumps(report.to_dict())


def test_missing_root_raises_file_not_found(tmp_path: Path) -> None:
    """Pins a scan of a mistyped path reporting an empty entity instead of failing clearly."""
    with pytest.raises(FileNotFoundError, match="no such entity folder"):
        scan_entity(tmp_path / ENTITY)
    (tmp_path / "KRT").write_text(_krt(CAMERAS))
    with pytest.raises(FileNotFoundError, match="is a file, not an entity folder"):
        scan_entity(tmp_path / "KRT")


def test_missing_items_pages_through_the_list(holed: Path) -> None:
    """Pins pagination that skips or repeats items at page boundaries."""
    report = scan_entity(holed)
    pages = [report.missing_items(offset, 4) for offset in range(0, 12, 4)]
    assert [len(page) for page in pages] == [4, 4, 1]
    assert sum(pages, []) == report.missing == report.missing_items()
    with pytest.raises(ValueError, match="offset and limit must be >= 0"):
        report.missing_items(-1, 4)


def test_to_dict_is_json_with_a_stable_key_order(holed: Path) -> None:
    """Pins a JSON report whose shape or order changes between scans (clients diff and page it)."""
    first, second = scan_entity(holed).to_dict(), scan_entity(holed).to_dict()
    assert json.dumps(first) == json.dumps(second)
    assert list(first) == [
        "entity",
        "entity_id",
        "root",
        "complete",
        "metadata",
        "frame_list_error",
        "cameras",
        "num_files",
        "num_samples",
        "num_extra_files",
        "num_missing",
        "totals",
        "expressions",
        "missing",
    ]
    sentence = json.loads(json.dumps(first))["expressions"][1]
    assert sentence["totals"]["all"] == {"num_expected": 21, "num_present": 15, "percent": 71.42}
    assert sentence["assets"]["transform"]["missing_frames"] == ["000201"]
    assert sentence["cameras"][2]["texture"] == {
        "num_expected": 2,
        "num_present": 0,
        "percent": 0.0,
        "missing_frames": ["000200", "000201"],
    }
    assert first["missing"][0] == {
        "kind": "mesh_obj",
        "expression": PUFF,
        "camera": None,
        "frame": "000100",
        "path": f"tracked_mesh/{PUFF}/000100.obj",
    }
    assert first["num_missing"] == 9 and first["totals"]["all"]["num_expected"] == 51


def test_percentages_are_floored_so_100_means_complete() -> None:
    """Pins rounding 999,999 of 1,000,000 files up to 100 %, which hides a missing file."""
    assert Tally(1_000_000, 999_999).percent == 99.99
    assert Tally(3, 2).percent == 66.66
    assert Tally(0, 0).percent is None


def test_format_report_renders_the_table_and_the_first_missing_items(holed: Path) -> None:
    """Pins the text view losing rows, percentages or the count of items not shown."""
    text = format_report(scan_entity(holed), max_missing=3)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("expression"))
    assert header.split() == [
        "expression",
        "frames",
        "mesh_bin",
        "mesh_obj",
        "transform",
        "average",
        "audio",
        "photo",
        "texture",
        "all",
        "samples",
        "extra",
    ]
    rows = {line.split()[0]: line.split()[1:] for line in lines[lines.index(header) + 1 :][:3]}
    assert rows[PUFF] == [
        "3",
        "100.0%",
        "66.6%",
        "100.0%",
        "66.6%",
        "-",
        "88.8%",
        "100.0%",
        "90.0%",
        "6",
        "0",
    ]
    assert rows[SENTENCE] == [
        "2",
        "100.0%",
        "100.0%",
        "50.0%",
        "100.0%",
        "0.0%",
        "66.6%",
        "66.6%",
        "71.4%",
        "4",
        "0",
    ]
    assert rows["total"][-3:] == ["82.3%", "10", "0"]  # 42 of 51
    assert "Missing files: 9" in text and "... and 6 more" in text
    assert f"images/{PUFF}/400004/000101.png" in text
    assert f"audio/{SENTENCE}.wav" not in text  # the 4th item, beyond max_missing


def test_scan_lists_folders_instead_of_a_stat_per_expected_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins a per-file stat creeping into the scan, which takes minutes on a real tree of
    hundreds of thousands of files: stat calls must not grow with the number of frames."""
    calls: list[str] = []

    def counted(name: str):
        original = getattr(os, name)

        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return call

    for name in ("stat", "lstat"):
        monkeypatch.setattr(os, name, counted(name))

    def count_stats(frames: dict[str, tuple[str, ...]], parent: Path) -> int:
        root = make_entity(parent, frames)
        calls.clear()
        scan_entity(root)
        return len(calls)

    few = count_stats({PUFF: ("000100",)}, tmp_path / "few")
    many = count_stats({PUFF: tuple(f"{frame:06d}" for frame in range(40))}, tmp_path / "many")
    assert few == many
