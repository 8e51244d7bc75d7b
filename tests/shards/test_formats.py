"""Parsers of every Multiface file: good input parses to the reference values, bad input
raises a FormatError that names the file, the line and what was expected."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from shards import formats
from shards.errors import FormatError
from shards.layout import MESH_BIN_BYTES, NUM_VERTICES, entity_id_of

KRT_TEXT = """400002
7000.5 0.0 667.0
0.0 7000.5 1024.0
0.0 0.0 1.0
0.1 0.0 0.0 0.0 0.0
1.0 0.0 0.0 10.0
0.0 1.0 0.0 20.0
0.0 0.0 1.0 1000.0

400004
6000 0 600
0 6000 1000
0 0 1
0 0 0 0 0
0 0 1 -5
0 1 0 0
-1 0 0 900

"""


def test_krt_parses_blocks_in_file_order():
    """Pins KRT parsing: camera order (the reference's cam index), K, distortion, [R|t], position."""
    cameras = formats.parse_krt(KRT_TEXT)
    assert list(cameras) == ["400002", "400004"]
    first, second = cameras["400002"], cameras["400004"]
    assert (first.index, second.index) == (0, 1)
    np.testing.assert_array_equal(first.intrin, [[7000.5, 0, 667], [0, 7000.5, 1024], [0, 0, 1]])
    np.testing.assert_array_equal(first.dist, [0.1, 0, 0, 0, 0])
    assert first.extrin.shape == (3, 4) and first.extrin.dtype == np.float64
    np.testing.assert_allclose(first.position, [-10, -20, -1000])
    rotation, translation = second.extrin[:, :3], second.extrin[:, 3]
    np.testing.assert_allclose(second.position, -rotation.T @ translation)
    assert formats.parse_krt(first.text)["400002"].extrin.tolist() == first.extrin.tolist()


def test_krt_without_trailing_blank_line():
    """Pins that a file ending right after the last extrinsic row still parses."""
    assert list(formats.parse_krt(KRT_TEXT.rstrip("\n"))) == ["400002", "400004"]


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (KRT_TEXT.replace("0.0 7000.5 1024.0", "0.0 7x00.5 1024.0"), 3, "intrinsic row"),
        (KRT_TEXT.replace("0.0 1.0 0.0 20.0", "0.0 1.0 0.0"), 7, "extrinsic row: 4 numbers"),
        (KRT_TEXT.replace("0.0 0.0 1.0 1000.0\n\n", "0.0 0.0 1.0 1000.0\nextra\n"), 9, "a blank line"),
        ("400002\n1 0 0\n0 1 0\n", 1, "7 lines"),
        (KRT_TEXT + KRT_TEXT, 19, "each camera once"),
    ],
)
def test_krt_malformed_names_file_and_line(text, line, expected):
    """Pins KRT error messages: file name, 1-based line and what was expected."""
    with pytest.raises(FormatError) as caught:
        formats.parse_krt(text, "ent/KRT")
    assert caught.value.source == "ent/KRT" and caught.value.line == line
    assert expected in str(caught.value) and str(caught.value).startswith(f"ent/KRT, line {line}")


def test_krt_tolerant_mode_keeps_indices_after_a_broken_block():
    """Pins that a broken block drops only its camera and later cameras keep their KRT index."""
    broken: dict[str, str] = {}
    cameras = formats.parse_krt(KRT_TEXT.replace("0.0 7000.5 1024.0", "nan? 1 2"), "KRT", broken)
    assert list(cameras) == ["400004"] and cameras["400004"].index == 1
    assert "400002" in broken and "line 3" in broken["400002"]


def test_empty_krt_is_an_error():
    """Pins that an empty KRT is rejected rather than yielding zero cameras."""
    with pytest.raises(FormatError, match="at least one camera"):
        formats.parse_krt("\n\n")


def test_frame_list():
    """Pins frame_list parsing: order kept, blank lines skipped, frames stay 6-digit strings."""
    text = "E057_Cheeks_Puffed 021897\n\nE061_Lips_Puffed 000102\n"
    assert formats.parse_frame_list(text) == [("E057_Cheeks_Puffed", "021897"), ("E061_Lips_Puffed", "000102")]


@pytest.mark.parametrize("line", ["E057 21897", "E057", "E057 021897 extra", "E057 02189a"])
def test_frame_list_malformed(line):
    """Pins that a bad frame_list line is named with its line number."""
    with pytest.raises(FormatError, match=r"frame_list.txt, line 2: expected '<EXPRESSION> <FRAME>'"):
        formats.parse_frame_list(f"E001_x 000001\n{line}\n")


OBJ_TEXT = """# comment
v 0 0 0
v 1 0 0
v 0 1 0
v 1 1 0
vt 0 0
vt 1 0
vt 0 1
vt 1 1 0
f 1/1 2/2 3/3
f 2/2/2 4/4/4 3/3/3
"""


def test_obj_topology_is_zero_based():
    """Pins OBJ parsing: v, vt (2 components kept), f a/b[/c] to 0-based int32 ids."""
    topology = formats.parse_obj(OBJ_TEXT)
    assert topology.verts.shape == (4, 3) and topology.verts.dtype == np.float32
    assert topology.uvs.shape == (4, 2) and topology.uvs.dtype == np.float32
    assert topology.vert_ids.dtype == np.int32 and topology.uv_ids.dtype == np.int32
    assert topology.vert_ids.tolist() == [[0, 1, 2], [1, 3, 2]]
    assert topology.uv_ids.tolist() == [[0, 1, 2], [1, 3, 2]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (OBJ_TEXT.replace("f 1/1 2/2 3/3", "f 1/1 2/2 3/3 4/4"), "a triangle"),
        (OBJ_TEXT.replace("f 1/1 2/2 3/3", "f 1 2 3"), "with a uv index"),
        (OBJ_TEXT.replace("f 1/1 2/2 3/3", "f 1/x 2/2 3/3"), "as integers"),
        (OBJ_TEXT.replace("v 1 0 0", "v 1 0"), "vertex x y z"),
        (OBJ_TEXT.replace("f 1/1 2/2 3/3", "f 1/1 2/2 9/3"), "face vertex indices"),
        ("# nothing\n", "'v' and 'f' lines"),
    ],
)
def test_obj_malformed(text, expected):
    """Pins OBJ error messages for non-triangles, missing uvs, bad numbers and bad indices."""
    with pytest.raises(FormatError, match=expected):
        formats.parse_obj(text, "m.obj")


def test_vertices_bin():
    """Pins the .bin format: float32 x,y,z for 7306 vertices, 87,672 bytes."""
    values = np.arange(NUM_VERTICES * 3, dtype=np.float32)
    verts = formats.parse_vertices(values.tobytes())
    assert MESH_BIN_BYTES == 87_672 and verts.shape == (NUM_VERTICES, 3) and verts.dtype == np.float32
    assert verts[1].tolist() == [3, 4, 5]
    with pytest.raises(FormatError, match="87672 bytes.*found '87668 bytes'"):
        formats.parse_vertices(values.tobytes()[:-4], "x.bin")


def test_transform():
    """Pins head-pose parsing: 3x4 or more rows, float64 like np.genfromtxt."""
    text = "1 0 0 5\n0 1 0 6\n0 0 1 7\n"
    pose = formats.parse_transform(text)
    assert pose.dtype == np.float64 and pose.shape == (3, 4) and pose[:, 3].tolist() == [5, 6, 7]
    assert formats.parse_transform(text + "0 0 0 1\n").shape == (4, 4)
    with pytest.raises(FormatError, match="line 2"):
        formats.parse_transform("1 0 0 5\n0 1 0\n0 0 1 7\n", "t.txt")
    with pytest.raises(FormatError, match="at least 3 rows"):
        formats.parse_transform("1 0 0 5\n")


def test_scalar_statistics():
    """Pins tex_var/vert_var parsing: one positive finite number."""
    assert formats.parse_scalar("  1234.5\n", "tex_var.txt") == 1234.5
    for bad in ("", "1 2", "abc", "-3", "nan"):
        with pytest.raises(FormatError, match="tex_var.txt"):
            formats.parse_scalar(bad, "tex_var.txt")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_check_and_decode():
    """Pins PNG validation: good RGB passes; truncation, a flipped payload bit and grey are named."""
    array = np.random.default_rng(0).integers(0, 255, (16, 12, 3), dtype=np.uint8)
    data = _png(array)
    assert formats.check_png(data, "a.png") == (12, 16)
    np.testing.assert_array_equal(formats.parse_png(data, "a.png"), array)
    with pytest.raises(FormatError, match="truncated"):
        formats.check_png(data[: len(data) // 2], "a.png")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(FormatError, match="CRC mismatch"):
        formats.check_png(bytes(flipped), "a.png")
    with pytest.raises(FormatError, match="8-bit RGB"):
        formats.check_png(_png(array[..., 0]), "a.png")
    with pytest.raises(FormatError, match="signature"):
        formats.check_png(b"GIF89a" + data, "a.png")


def test_camera_split_and_test_segment():
    """Pins the two split files of the reference: camera split and test segment."""
    split = formats.parse_camera_split(json.dumps({"full": {"train": [400002, "400004"], "test": ["400004"]}}))
    assert split == {"train": ["400002", "400004"], "test": ["400004"], "visual": []}
    assert formats.parse_test_segment('{"segment": ["E061_Lips_Puffed"]}') == ["E061_Lips_Puffed"]
    with pytest.raises(FormatError, match=r"cams.json, line 1: expected JSON"):
        formats.parse_camera_split("{", "cams.json")
    with pytest.raises(FormatError, match='"full"'):
        formats.parse_camera_split('{"train": []}', "cams.json")
    with pytest.raises(FormatError, match='"segment"'):
        formats.parse_test_segment('{"segments": ["E0"]}', "seg.json")


def test_entity_name():
    """Pins the entity root name rule and its error message."""
    assert entity_id_of("m--20180227--0000--6795937--GHS") == "6795937"
    assert entity_id_of("m--20190529--1300--002421669--GHS") == "002421669"
    with pytest.raises(ValueError, match="m--YYYYMMDD--HHMM--<ENTITY_ID>--GHS"):
        entity_id_of("6795937")
