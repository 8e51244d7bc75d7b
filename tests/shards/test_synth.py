"""Tests of the synthetic entity generator (``shards.synth``).

The files are checked with readers written here from the reference (section 1-4), not with the
generator's own helpers, so a convention that drifts in both places at once still fails.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import struct
import subprocess
import sys
import wave
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from shards.layout import ENTITY_NAME_RE, MESH_BIN_BYTES, NUM_VERTICES, EntityLayout
from shards.synth import defects, synthesize
from shards.synth.cli import register
from shards.synth.raster import rasterize, sample_bilinear

ROWS, COLS, TEX = 128, 84, 64
SMALL = {"expressions": 3, "frames": 3, "cameras": 3, "photo_size": (ROWS, COLS), "tex_size": TEX, "seed": 11}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth"), **SMALL)


@pytest.fixture
def copy(small, tmp_path) -> Path:
    """A private copy of the small entity, for tests that damage it."""
    return Path(shutil.copytree(small, tmp_path / small.name))


def read_krt(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The seed's load_krt, in KRT order."""
    cameras = {}
    with open(path) as handle:
        while name := handle.readline():
            intrinsic = [[float(x) for x in handle.readline().split()] for _ in range(3)]
            distortion = [float(x) for x in handle.readline().split()]
            extrinsic = [[float(x) for x in handle.readline().split()] for _ in range(3)]
            assert handle.readline() == "\n"
            cameras[name[:-1]] = {
                "K": np.array(intrinsic),
                "dist": np.array(distortion),
                "RT": np.array(extrinsic),
            }
    return cameras


def read_obj(path: Path) -> dict[str, np.ndarray]:
    """The seed's load_obj (split on single spaces, 1-based indices made 0-based)."""
    verts, uvs, vert_ids, uv_ids = [], [], [], []
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if parts[0] == "v":
            verts.append([float(x) for x in parts[1:]])
        elif parts[0] == "vt":
            uvs.append([float(x) for x in parts[1:]])
        elif parts[0] == "f":
            vert_ids.append([int(x.split("/")[0]) for x in parts[1:]])
            uv_ids.append([int(x.split("/")[1]) for x in parts[1:]])
    return {
        "verts": np.array(verts),
        "uvs": np.array(uvs),
        "vert_ids": np.array(vert_ids) - 1,
        "uv_ids": np.array(uv_ids) - 1,
    }


def frame_list(root: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(" ")) for line in (root / "frame_list.txt").read_text().splitlines()]


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def expected_files(root: Path) -> set[str]:
    cameras = list(read_krt(root / "KRT"))
    names = {"KRT", "frame_list.txt", "tex_mean.png", "tex_var.txt", "vert_mean.bin", "vert_var.txt"}
    for expression, frame in frame_list(root):
        for camera in cameras:
            names.add(f"images/{expression}/{camera}/{frame}.png")
            names.add(f"unwrapped_uv_1024/{expression}/{camera}/{frame}.png")
        names.add(f"unwrapped_uv_1024/{expression}/average/{frame}.png")
        names |= {f"tracked_mesh/{expression}/{frame}{end}" for end in (".bin", ".obj", "_transform.txt")}
        if expression.startswith("SEN_"):
            names.add(f"audio/{expression}.wav")
    return names


def test_layout_is_exactly_the_reference_tree(small):
    """Pins the file tree of reference section 1: no missing, misnamed or extra file."""
    assert ENTITY_NAME_RE.match(small.name)
    pairs = frame_list(small)
    assert len(pairs) == 9
    assert [e for e, _ in pairs[::3]] == ["E057_Cheeks_Puffed", "E061_Lips_Puffed", pairs[6][0]]
    assert pairs[6][0].startswith("SEN_")
    assert all(re.fullmatch(r"\d{6}", frame) for _, frame in pairs)
    assert (small / "frame_list.txt").read_text().endswith("\n")
    cameras = list(read_krt(small / "KRT"))
    assert len(cameras) == 3 and all(re.fullmatch(r"4000\d\d", name) for name in cameras)
    assert cameras[0] == "400002"
    files = {str(path.relative_to(small)) for path in small.rglob("*") if path.is_file()}
    assert files == expected_files(small)


def test_file_formats(small):
    """Pins sizes, dtypes and text formats of every kind of file (reference section 2)."""
    expression, frame = frame_list(small)[0]
    camera = next(iter(read_krt(small / "KRT")))
    assert load_rgb(small / f"images/{expression}/{camera}/{frame}.png").shape == (ROWS, COLS, 3)
    for name in (camera, "average"):
        assert load_rgb(small / f"unwrapped_uv_1024/{expression}/{name}/{frame}.png").shape == (TEX, TEX, 3)
    assert load_rgb(small / "tex_mean.png").shape == (TEX, TEX, 3)
    for name in ("tex_var.txt", "vert_var.txt"):
        assert float(np.genfromtxt(small / name)) > 0
    assert (small / "vert_mean.bin").stat().st_size == MESH_BIN_BYTES == 87_672
    mesh = small / f"tracked_mesh/{expression}/{frame}"
    assert Path(f"{mesh}.bin").stat().st_size == 87_672
    vertices = np.fromfile(f"{mesh}.bin", dtype=np.float32).reshape(-1, 3)
    assert vertices.shape == (NUM_VERTICES, 3)

    obj = read_obj(Path(f"{mesh}.obj"))
    assert obj["verts"].shape == (7306, 3) and len(obj["vert_ids"]) == 14_608
    assert obj["uvs"].shape == (7563, 2)
    np.testing.assert_allclose(obj["verts"], vertices, atol=1e-4)
    assert obj["vert_ids"].min() == 0 and obj["vert_ids"].max() == NUM_VERTICES - 1
    assert obj["uv_ids"].min() == 0 and obj["uv_ids"].max() == len(obj["uvs"]) - 1
    assert all(
        re.fullmatch(r"f \d+/\d+ \d+/\d+ \d+/\d+", line)
        for line in Path(f"{mesh}.obj").read_text().splitlines()
        if line[0] == "f"
    )

    transform = np.genfromtxt(f"{mesh}_transform.txt")
    assert transform.shape == (3, 4)
    np.testing.assert_allclose(transform[:, :3] @ transform[:, :3].T, np.eye(3), atol=1e-6)

    sentence = next(e for e, _ in frame_list(small) if e.startswith("SEN_"))
    with wave.open(str(small / f"audio/{sentence}.wav")) as audio:
        assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (1, 2, 16000)
        assert audio.getnframes() == round(3 * 3 / 30 * 16000)


def test_krt_describes_a_rig_around_the_head(small):
    """Pins KRT format 2.1 (9-line blocks, 5 distortion numbers) and a plausible mm-scale rig."""
    text = (small / "KRT").read_text()
    assert len(text.split("\n")) == 3 * 9 + 1 and text.endswith("\n\n")
    for camera in read_krt(small / "KRT").values():
        K, R, t = camera["K"], camera["RT"][:, :3], camera["RT"][:, 3]
        assert camera["dist"].shape == (5,)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
        assert K[2].tolist() == [0.0, 0.0, 1.0] and K[0, 1] == 0.0
        assert 5000 * ROWS / 2048 < K[1, 1] < 7000 * ROWS / 2048
        assert abs(K[0, 2] - COLS / 2) < 0.05 * COLS and abs(K[1, 2] - ROWS / 2) < 0.05 * ROWS
        position = -R.T @ t
        assert 900 < np.linalg.norm(position) < 1300
        assert (R @ np.zeros(3) + t)[2] > 900  # the head (world origin) is in front of the camera


def test_head_mesh_has_a_real_uv_chart_and_moves(small):
    """Pins the 7306-vertex closed head, a non-overlapping UV chart covering most of [0,1]^2, a
    ~200 mm head and per-frame deformation (a constant mesh would give a VAE nothing to learn)."""
    pairs = frame_list(small)
    obj = read_obj(small / f"tracked_mesh/{pairs[0][0]}/{pairs[0][1]}.obj")
    corners = obj["uvs"][obj["uv_ids"]]
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    assert (area > 0).all() or (area < 0).all()
    assert obj["uvs"].min() >= 0.0 and obj["uvs"].max() <= 1.0
    # Count, on a fine grid of points, how many triangles strictly contain each: a fold or an
    # overlap shows up as a count of 2.
    grid = 512
    low = np.floor(corners.min(axis=1) * grid).astype(np.int64)
    span = np.floor(corners.max(axis=1) * grid).astype(np.int64) + 1 - low
    sizes = span[:, 0] * span[:, 1]
    face = np.repeat(np.arange(len(corners)), sizes)
    offset = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    j = low[face, 0] + offset % span[face, 0]
    i = low[face, 1] + offset // span[face, 0]
    x, y = (j + 0.4137) / grid, (i + 0.5719) / grid  # off-centre: no point lies on a grid-aligned edge
    (ax, ay), (bx, by), (cx, cy) = (corners[face, k].T for k in range(3))
    area2 = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    b1 = ((x - ax) * (cy - ay) - (y - ay) * (cx - ax)) / area2
    b2 = ((y - ay) * (bx - ax) - (x - ax) * (by - ay)) / area2
    inside = (b1 > 0) & (b2 > 0) & (b1 + b2 < 1)
    count = np.bincount((i * grid + j)[inside], minlength=grid * grid)
    assert count.max() == 1
    assert (count == 1).mean() > 0.85
    assert np.isclose(np.abs(area).sum(), 0.91, atol=0.01)
    edges = np.sort(obj["vert_ids"][:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)
    assert (uses == 2).all()  # closed: every edge borders two triangles

    meshes = np.stack(
        [np.fromfile(small / f"tracked_mesh/{e}/{f}.bin", dtype=np.float32).reshape(-1, 3) for e, f in pairs]
    )
    assert 180 < np.ptp(meshes[0][:, 1]) < 320
    motion = np.abs(meshes - meshes.mean(0)).max(axis=(1, 2))
    assert (motion > 0.5).all() and (motion < 40).all()


def trace_pixels(root: Path, expression: str, frame: str, camera: str, pixels: np.ndarray):
    """Find what each chosen photo pixel shows, from the files, by brute force over all triangles.

    Follows the reference recipe: M = K [R_C R_f | R_C t_f + t_C], x = p0/p2, y = p1/p2, pixel
    centres at +0.5, screen-space-linear barycentrics (w = 1), nearest depth, UVs from the OBJ.

    Returns:
        covered: (P,) bool; uv: (P, 2) float64 interpolated texture coordinates.
    """
    krt = read_krt(root / "KRT")[camera]
    pose = np.genfromtxt(root / f"tracked_mesh/{expression}/{frame}_transform.txt")
    R_C, t_C, R_f, t_f = krt["RT"][:, :3], krt["RT"][:, 3], pose[:, :3], pose[:, 3]
    M = krt["K"] @ np.hstack([R_C @ R_f, (R_C @ t_f + t_C)[:, None]])
    verts = np.fromfile(root / f"tracked_mesh/{expression}/{frame}.bin", dtype=np.float32).reshape(-1, 3)
    obj = read_obj(root / f"tracked_mesh/{expression}/{frame}.obj")
    p = np.hstack([verts, np.ones((len(verts), 1))]) @ M.T
    xy, depth = p[:, :2] / p[:, 2:], p[:, 2]
    c, z = xy[obj["vert_ids"]], depth[obj["vert_ids"]]
    e1, e2 = c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    covered, uv = [], []
    for chunk in np.array_split(pixels, max(1, len(pixels) // 32)):
        row, col = chunk[:, :1] + 0.5, chunk[:, 1:] + 0.5  # (P, 1) against (F,) triangles
        dx, dy = col - c[:, 0, 0], row - c[:, 0, 1]
        b1 = (dx * e2[:, 1] - dy * e2[:, 0]) / area
        b2 = (dy * e1[:, 0] - dx * e1[:, 1]) / area
        inside = (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1)
        surface = np.where(inside, z[:, 0] * (1 - b1 - b2) + z[:, 1] * b1 + z[:, 2] * b2, np.inf)
        face, pick = np.argmin(surface, axis=1), np.arange(len(chunk))
        weights = np.stack([1 - b1[pick, face] - b2[pick, face], b1[pick, face], b2[pick, face]], 1)
        covered.append(inside.any(axis=1))
        uv.append(np.einsum("pk,pkc->pc", weights, obj["uvs"][obj["uv_ids"][face]]))
    return np.concatenate(covered), np.concatenate(uv)


def bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """nvdiffrast's linear lookup: texel centres at (i + 0.5) / size, wrap addressing."""
    size = texture.shape[0]
    x, y = uv[:, 0] * size - 0.5, uv[:, 1] * size - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def texel(di: int, dj: int) -> np.ndarray:
        return texture[(y0 + di) % size, (x0 + dj) % size].astype(np.float64)

    top = texel(0, 0) * (1 - fx) + texel(0, 1) * fx
    bottom = texel(1, 0) * (1 - fx) + texel(1, 1) * fx
    return top * (1 - fy) + bottom * fy


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)))


def test_rerendering_the_ground_truth_reproduces_the_photo(small):
    """Pins the projection/orientation conventions of reference section 4: a renderer fed the
    files reproduces each photo (PSNR >= 30 dB over covered pixels), while the same renderer with
    an unflipped texture does not (so the check can fail)."""
    rng = np.random.default_rng(0)
    expression, frame = frame_list(small)[4]
    for camera in read_krt(small / "KRT"):
        photo = load_rgb(small / f"images/{expression}/{camera}/{frame}.png").astype(np.float64)
        pixels = np.stack([rng.integers(0, ROWS, 300), rng.integers(0, COLS, 300)], axis=1)
        covered, uv = trace_pixels(small, expression, frame, camera, pixels)
        assert covered.sum() > 60
        target = photo[pixels[:, 0], pixels[:, 1]]
        assert np.mean((target[~covered] == 28).all(axis=1)) > 0.98  # background is the constant grey
        texture = load_rgb(small / f"unwrapped_uv_1024/{expression}/{camera}/{frame}.png")
        assert psnr(bilinear(texture[::-1], uv[covered]), target[covered]) >= 30.0
        assert psnr(bilinear(texture, uv[covered]), target[covered]) < 25.0


def test_per_view_textures_are_zero_exactly_where_unseen(small):
    """Pins texture semantics: per-view texels are all-zero (unseen) or the albedo (>= 1 in every
    channel); the average is their mean over seeing cameras; the back of the head is unseen by the
    frontal rig; the frontal camera sees the face centre and only texels that face it."""
    cameras = list(read_krt(small / "KRT"))
    for expression, frame in frame_list(small)[:3]:
        average = load_rgb(small / f"unwrapped_uv_1024/{expression}/average/{frame}.png")
        views = np.stack(
            [load_rgb(small / f"unwrapped_uv_1024/{expression}/{c}/{frame}.png") for c in cameras]
        )
        seen = views.any(axis=3)
        assert (views.all(axis=3) == seen).all()
        assert (average.any(axis=2) == seen.any(axis=0)).all()
        total = views.astype(np.int64).sum(0)
        count = np.maximum(seen.sum(0), 1)[..., None]
        np.testing.assert_array_equal(
            average, np.rint(total / count).astype(np.uint8) * seen.any(0)[..., None]
        )
        # The back of the head (the UV seam) between brow and chin height faces away from every
        # camera; only the crown and the underside of the neck show there from high/low cameras.
        back = np.concatenate(
            [seen[:, TEX // 4 : 7 * TEX // 8, : TEX // 16], seen[:, TEX // 4 : 7 * TEX // 8, -TEX // 16 :]]
        )
        assert not back.any()
        assert seen[0, int(TEX * 0.5), TEX // 2]  # face centre (PNG rows: top of head first)
        assert 0.15 < seen[0].mean() < 0.6


def test_same_seed_same_bytes_other_seed_other_entity(small, tmp_path):
    """Pins byte reproducibility: same arguments give identical files (no time stamps, fixed PNG
    level); another seed gives another entity."""
    again = synthesize(tmp_path / "again", **SMALL)
    assert again.name == small.name
    assert digests(again) == digests(small)
    other = synthesize(tmp_path / "other", **{**SMALL, "seed": 12})
    assert other.name != small.name
    assert (other / "KRT").read_bytes() != (small / "KRT").read_bytes()


def test_workers_do_not_change_the_bytes(tmp_path):
    """Pins that multiprocessing is invisible in the output (every file depends on the arguments
    only, never on scheduling)."""
    arguments = {**SMALL, "expressions": 1, "frames": 2, "cameras": 2}
    serial = synthesize(tmp_path / "serial", **arguments)
    parallel = synthesize(tmp_path / "parallel", workers=2, **arguments)
    assert digests(serial) == digests(parallel)


def test_statistics_are_computed_from_the_files(small):
    """Pins the statistics definitions: tex_mean = mean of average textures over seen frames,
    tex_var = mean squared deviation from it, vert_mean/vert_var likewise for meshes."""
    pairs = frame_list(small)
    textures = np.stack(
        [load_rgb(small / f"unwrapped_uv_1024/{e}/average/{f}.png") for e, f in pairs]
    ).astype(np.float64)
    seen = textures.any(axis=3)
    count = seen.sum(0)
    mean = np.where(count[..., None] > 0, np.rint(textures.sum(0) / np.maximum(count, 1)[..., None]), 0)
    np.testing.assert_array_equal(load_rgb(small / "tex_mean.png"), mean)
    deviation = ((textures - mean) ** 2)[seen]
    assert float(np.genfromtxt(small / "tex_var.txt")) == pytest.approx(deviation.mean(), rel=1e-6)
    meshes = np.stack([np.fromfile(small / f"tracked_mesh/{e}/{f}.bin", dtype=np.float32) for e, f in pairs])
    vert_mean = np.fromfile(small / "vert_mean.bin", dtype=np.float32)
    np.testing.assert_allclose(vert_mean, meshes.astype(np.float64).mean(0), atol=1e-4)
    vert_var = float(np.genfromtxt(small / "vert_var.txt"))
    assert vert_var == pytest.approx(((meshes - vert_mean) ** 2).mean(), rel=1e-5)


def test_rasterizer_matches_brute_force_and_sampler_hits_texel_centres():
    """Pins the rasteriser (nearest covering triangle per pixel centre, both windings) and the
    sampler's half-texel convention (a lookup at a texel centre returns that texel)."""
    rng = np.random.default_rng(3)
    xy, depth = rng.uniform(-4, 28, (30, 2)), rng.uniform(1, 2, 30)
    faces = rng.integers(0, 30, (25, 3))
    raster = rasterize(xy, depth, faces, 20, 24)
    triangle = np.full(20 * 24, -1)
    triangle[raster.pixel] = raster.triangle
    for pixel in range(20 * 24):
        x, y = pixel % 24 + 0.5, pixel // 24 + 0.5
        best, nearest = -1, np.inf
        for index, face in enumerate(faces):
            (ax, ay), (bx, by), (cx, cy) = xy[face]
            area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
            if abs(area) < 1e-12:
                continue
            b1 = ((x - ax) * (cy - ay) - (y - ay) * (cx - ax)) / area
            b2 = ((y - ay) * (bx - ax) - (x - ax) * (by - ay)) / area
            if b1 >= 0 and b2 >= 0 and b1 + b2 <= 1:
                z = depth[face] @ [1 - b1 - b2, b1, b2]
                if z < nearest:
                    best, nearest = index, z
        assert triangle[pixel] == best
    texture = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    uv = np.stack([(j.ravel() + 0.5) / 8, (i.ravel() + 0.5) / 8], axis=1)
    np.testing.assert_array_equal(sample_bilinear(texture, uv), texture.reshape(-1, 3))
    inner = rng.uniform(0.07, 0.93, (50, 2))
    np.testing.assert_allclose(
        sample_bilinear(texture, inner), sample_bilinear(texture, inner, boundary="clamp")
    )


def files_after(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def test_drop_defects_remove_exactly_what_they_return(copy):
    """Pins that each drop_* injector removes exactly the files it reports (tests rely on the
    holes being known), and leaves frame_list.txt listing the dropped frames."""
    layout = EntityLayout(copy)
    (e0, f0), (e0b, f0b), _, (e1, f1) = frame_list(copy)[:4]
    cameras = list(read_krt(copy / "KRT"))
    before = files_after(copy)
    cases = [
        (
            defects.drop_frame,
            (copy, e0, f0, cameras[1]),
            {layout.photo(e0, cameras[1], f0), layout.texture(e0, cameras[1], f0)},
        ),
        (defects.drop_frame, (copy, e0b, f0b), None),
        (defects.drop_textures, (copy, e1, cameras[0], [f1]), {layout.texture(e1, cameras[0], f1)}),
        (
            defects.drop_average_textures,
            (copy, e1),
            {layout.average_texture(e1, f) for e, f in frame_list(copy) if e == e1},
        ),
        (defects.drop_meshes, (copy, e1, [f1], ["bin"]), {layout.mesh_bin(e1, f1)}),
        (defects.drop_camera, (copy, cameras[2]), None),
    ]
    for function, arguments, expected in cases:
        removed = function(*arguments)
        assert removed == sorted(removed) and removed
        if expected is not None:
            assert set(removed) == expected
        assert not any(path.exists() for path in removed)
        assert files_after(copy) == before - set(removed)
        before = files_after(copy)
    whole_frame = {str(path.relative_to(copy)) for path in defects.drop_frame(copy, e0b, f0b)}
    assert whole_frame == set()  # already gone: nothing more to remove
    assert not layout.photo_dir(e0, cameras[2]).exists()
    assert (e0b, f0b) in frame_list(copy)


def test_drop_frame_from_everything_lists_every_file_of_the_frame(copy):
    """Pins drop_frame without a camera: photos, per-view and average textures, .bin/.obj/transform."""
    expression, frame = frame_list(copy)[1]
    removed = {str(path.relative_to(copy)) for path in defects.drop_frame(copy, expression, frame)}
    assert removed == {name for name in expected_files(copy) if f"/{frame}" in name and expression in name}
    assert len(removed) == 3 * 2 + 1 + 3


def test_corrupt_truncate_and_break_krt(copy):
    """Pins the damaging injectors: a corrupt PNG keeps its size but fails its IDAT CRC and both
    decoders; a truncated .bin is shorter; a broken KRT block has an unparsable number line."""
    expression, frame = frame_list(copy)[0]
    camera = list(read_krt(copy / "KRT"))[1]
    png = copy / f"images/{expression}/{camera}/{frame}.png"
    size = png.stat().st_size
    assert defects.corrupt_png(png) == [png] and png.stat().st_size == size
    data, offset = png.read_bytes(), 8
    while data[offset + 4 : offset + 8] != b"IDAT":
        offset += 12 + struct.unpack(">I", data[offset : offset + 4])[0]
    length = struct.unpack(">I", data[offset : offset + 4])[0]
    stored_crc = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])[0]
    assert zlib.crc32(data[offset + 4 : offset + 8 + length]) != stored_crc
    assert cv2.imread(str(png)) is None
    with pytest.raises(OSError), Image.open(png) as image:
        image.load()
    chosen = defects.corrupt_png(copy, seed=3)
    assert chosen == defects.corrupt_png(copy, seed=3)  # the seed picks the same file again

    mesh = copy / f"tracked_mesh/{expression}/{frame}.bin"
    assert defects.truncate_bin(mesh) == [mesh] and mesh.stat().st_size == MESH_BIN_BYTES // 2
    assert defects.truncate_bin(copy, seed=1)[0].stat().st_size < MESH_BIN_BYTES

    before = (copy / "KRT").read_text().split("\n")
    assert defects.break_krt(copy, camera) == [copy / "KRT"]
    after = (copy / "KRT").read_text().split("\n")
    changed = [index for index, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [9 * 1 + 1]
    with pytest.raises(ValueError):
        [float(x) for x in after[changed[0]].split()]
    with pytest.raises(ValueError, match="no block"):
        defects.break_krt(copy, "999999")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="multiface")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_only_the_entity_path(tmp_path, capsys):
    """Pins the command's contract: stdout is exactly the entity path (scripts capture it)."""
    argv = ["synth", str(tmp_path), "--expressions", "1", "--frames", "1", "--cameras", "1"]
    assert run_cli([*argv, "--photo-size", "64x42", "--tex-size", "32", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and Path(out.strip()).parent == tmp_path
    assert ENTITY_NAME_RE.match(Path(out.strip()).name) and (Path(out.strip()) / "KRT").is_file()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--photo-size", "12x"], ["'12x'", "ROWSxCOLS"]),
        (["--frames", "0"], ["'0'", "at least 1"]),
        (["--tex-size", "many"], ["'many'", "integer"]),
    ],
)
def test_cli_rejects_bad_values_naming_them(tmp_path, capsys, flags, named):
    """Pins argument errors: exit status 2 and a message naming the bad value and the expected form."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["synth", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert all(text in error for text in named)


def test_api_errors_name_the_value_and_the_fix(tmp_path, capsys):
    """Pins ValueError/FileExistsError messages for out-of-range values and an existing entity."""
    with pytest.raises(ValueError, match=r"'12x'.*ROWSxCOLS"):
        synthesize(tmp_path, photo_size="12x")
    with pytest.raises(ValueError, match="texture size must be an integer from 32"):
        synthesize(tmp_path, tex_size=16)
    with pytest.raises(ValueError, match="number of expressions .* from 1 to 20, got 21"):
        synthesize(tmp_path, expressions=21)
    arguments = {"expressions": 1, "frames": 1, "cameras": 1, "photo_size": "32x24", "tex_size": 32}
    synthesize(tmp_path, **arguments)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(tmp_path, **arguments)
    assert synthesize(tmp_path, overwrite=True, **arguments).is_dir()
    argv = [
        "synth",
        str(tmp_path),
        "--photo-size",
        "32x24",
        "--tex-size",
        "32",
        "--frames",
        "1",
        "--seed",
        "9",
    ]
    assert run_cli(argv) == 0
    assert run_cli(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_shards_synth_never_imports_torch_or_fastapi():
    """Pins the dependency rule: the format library (and its generator) imports neither torch nor fastapi."""
    code = "import sys, shards.synth, shards.synth.cli, shards.synth.defects; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
    )
    assert result.stdout.strip() == "[]"
