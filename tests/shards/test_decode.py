"""Decoding a shard sample gives exactly the reference Dataset's fields, computed here
independently from the raw entity files with the formulas of reference section 3."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import webdataset
from PIL import Image

from shards.decode import ALL_FIELDS, EntityMetadata, decode_sample, members_needed, sample_decoder
from shards.ingest import ingest


def _krt(root):
    cameras, lines = {}, (root / "KRT").read_text().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        rows = [[float(x) for x in lines[i + k].split()] for k in range(1, 8)]
        cameras[lines[i].strip()] = (len(cameras), np.array(rows[:3]), np.array(rows[4:7]))
        i += 9
    return cameras


def reference_fields(root, exp, frame, cam, size):
    """The reference formulas, written out here without project code."""
    index, intrin, extrin = _krt(root)[cam]
    texmean = np.flip(np.asarray(Image.open(root / "tex_mean.png"), dtype=np.float32), 0).copy()
    texstd = float(np.loadtxt(root / "tex_var.txt")) ** 0.5
    vertmean = np.fromfile(root / "vert_mean.bin", dtype=np.float32)
    vertstd = float(np.loadtxt(root / "vert_var.txt")) ** 0.5

    def texture(path):
        t = np.asarray(Image.open(path), dtype=np.float32)[::-1].copy()
        zero = t == 0
        t = (t - texmean) / np.float32(texstd)
        t[zero] = 0
        return cv2.resize(t, (size, size)).transpose(2, 0, 1), zero

    tex, zero = texture(root / f"unwrapped_uv_1024/{exp}/{cam}/{frame}.png")
    avg, _ = texture(root / f"unwrapped_uv_1024/{exp}/average/{frame}.png")
    transf = np.loadtxt(root / f"tracked_mesh/{exp}/{frame}_transform.txt")
    r_f, t_f = transf[:3, :3], transf[:3, 3]
    r_c, t_c = extrin[:, :3], extrin[:, 3]
    campos = -r_c.T @ t_c
    head_cam = r_f.T @ (campos - t_f)
    verts = np.fromfile(root / f"tracked_mesh/{exp}/{frame}.bin", dtype=np.float32)
    return {
        "photo": np.asarray(Image.open(root / f"images/{exp}/{cam}/{frame}.png"), dtype=np.float32) / 255,
        "tex": tex,
        "avg_tex": avg,
        "mask": 1 - cv2.resize(zero.astype(np.float32), (size, size)).transpose(2, 0, 1),
        "aligned_verts": ((verts - vertmean) / np.float32(vertstd)).reshape(-1, 3),
        "M": intrin @ np.hstack([r_c @ r_f, (r_c @ t_f + t_c)[:, None]]),
        "view": head_cam / np.linalg.norm(head_cam),
        "transf": transf,
        "cam": index,
        "cam_idx": cam,
        "exp": exp,
        "frame": frame,
    }


@pytest.fixture
def shard_folder(entity, tmp_path):
    ingest(entity, tmp_path / "shards", shard_size=10**9)
    return tmp_path / "shards" / entity.name


@pytest.mark.parametrize("size", [64, 32])
def test_decoded_fields_equal_the_reference_formulas(entity, shard_folder, size):
    """Pins decode against reference section 3: names, dtypes, shapes and values of every field."""
    meta = EntityMetadata.from_shard_folder(shard_folder)
    urls = sorted(str(path) for path in (shard_folder / "shards").glob("*.tar"))
    count = 0
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        fields = decode_sample(sample, meta, tex_size=size)
        assert set(fields) == set(ALL_FIELDS)
        exp, frame, cam = sample["__key__"].split("/")
        expected = reference_fields(entity, exp, frame, cam, size)
        for name in ("photo", "tex", "avg_tex", "mask", "aligned_verts", "transf"):
            assert fields[name].dtype == np.float32, name
            assert fields[name].shape == expected[name].shape, name
            np.testing.assert_allclose(fields[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
        for name in ("M", "view"):
            assert fields[name].dtype == np.float32
            np.testing.assert_allclose(fields[name], expected[name], rtol=1e-5, err_msg=name)
        for name in ("cam", "cam_idx", "exp", "frame"):
            assert fields[name] == expected[name]
        assert fields["tex"].shape == (3, size, size) and fields["photo"].ndim == 3
        assert fields["vert_ids"].dtype == np.int32 and fields["vert_ids"].min() == 0
        assert fields["uvs"].shape[1] == 2
        count += 1
    assert count > 0


def test_only_needed_members_are_decoded(shard_folder):
    """Pins that leaving out the photo field needs no photo member (no photo decode without screen loss)."""
    fields = [name for name in ALL_FIELDS if name != "photo"]
    assert "photo.png" not in members_needed(fields)
    meta = EntityMetadata.from_shard_folder(shard_folder)
    urls = sorted(str(path) for path in (shard_folder / "shards").glob("*.tar"))
    sample = next(iter(webdataset.WebDataset(urls, shardshuffle=False)))
    del sample["photo.png"]
    decoded = sample_decoder(meta, 64, fields)(sample)
    assert "photo" not in decoded and decoded["tex"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown field"):
        members_needed(["photos"])
