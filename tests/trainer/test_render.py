"""Tests for trainer.render: the projection on the CPU, the nvdiffrast renderer on the GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import cpp_extension

from trainer import render
from trainer.render import project

ROWS, COLS = 64, 48


def test_project_matches_hand_computation() -> None:
    """Pins reference section 4: p = M [v; 1]; x = p0/(p2 cols/2) - 1, y = p1/(p2 rows/2) - 1,
    z = p2 / max p2 per mesh, w = 1 (swapped rows/cols or a global max would fail)."""
    rng = np.random.default_rng(3)
    verts = rng.normal(size=(2, 5, 3))
    verts[..., 2] += 4.0
    M = rng.normal(scale=0.2, size=(2, 3, 4))
    M[:, :, :3] += np.eye(3) * [100.0, 120.0, 1.0]
    M[:, 2, 3] = [1.0, 3.0]
    expected = np.zeros((2, 5, 4))
    for n in range(2):
        p = np.array([M[n] @ np.append(v, 1.0) for v in verts[n]])
        for i in range(5):
            expected[n, i] = [
                p[i, 0] / (p[i, 2] * COLS / 2) - 1,
                p[i, 1] / (p[i, 2] * ROWS / 2) - 1,
                p[i, 2] / p[:, 2].max(),
                1.0,
            ]
    got = project(torch.tensor(verts, dtype=torch.float32), torch.tensor(M, dtype=torch.float32), ROWS, COLS)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_renderer_without_cuda_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins a RuntimeError that says the screen loss needs CUDA + nvdiffrast, not a crash inside it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"screen loss.*CUDA.*nvdiffrast"):
        render.Renderer()


def test_plugin_name_is_read_from_the_import_error() -> None:
    """Pins finding the JIT plugin's name in the error (attribute or message), and only for nvdiffrast."""
    name = "nvdiffrast_plugin_0_3_3_1_torch2_11_0_cu130"
    assert render._plugin_name(ModuleNotFoundError(f"No module named '{name}'", name=name)) == name
    assert render._plugin_name(ModuleNotFoundError(f"No module named '{name}'")) == name
    assert render._plugin_name(ModuleNotFoundError("No module named 'numpyx'", name="numpyx")) is None


def test_plugin_build_folder_goes_on_sys_path_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins the torch >= 2.9 workaround: after "No module named nvdiffrast_plugin_..." the build
    folder that torch reports for that name is put on sys.path and the call is retried once."""
    plugin = "nvdiffrast_plugin_test_fake"
    (tmp_path / f"{plugin}.py").write_text("VALUE = 42\n")
    asked = []

    def build_directory(name: str, verbose: bool) -> str:
        asked.append(name)
        return str(tmp_path)

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, plugin, raising=False)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", build_directory)

    def create() -> int:
        import importlib

        return importlib.import_module(plugin).VALUE

    assert render._with_plugin_on_path(create) == 42
    assert asked == [plugin]
    assert sys.path[0] == str(tmp_path)
    sys.modules.pop(plugin, None)


def test_unrelated_import_errors_are_not_swallowed() -> None:
    """Pins that only the nvdiffrast plugin error triggers the retry."""

    def create() -> None:
        raise ModuleNotFoundError("No module named 'cv3'", name="cv3")

    with pytest.raises(ModuleNotFoundError, match="cv3"):
        render._with_plugin_on_path(create)


def _quad_scene(device: torch.device) -> tuple[torch.Tensor, ...]:
    """A quad whose corners project to pixels (8, 16), (40, 16), (40, 48), (8, 48) (col, row),
    at depths 1..2, uv (0,0)..(1,1); the second batch item is moved 4 columns right through M."""
    pixels = torch.tensor([[8.0, 16.0], [40.0, 16.0], [40.0, 48.0], [8.0, 48.0]])
    depth = torch.tensor([1.0, 1.5, 2.0, 1.25])
    verts = torch.cat([pixels * depth[:, None], depth[:, None]], dim=1)
    M = torch.zeros(2, 3, 4)
    M[:, :, :3] = torch.eye(3)
    M[1, 0, 2] = 4.0  # column + 4 * depth / depth
    vert_ids = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    return tuple(t.to(device) for t in (M, verts.expand(2, 4, 3).contiguous(), vert_ids, uvs, vert_ids))


@pytest.mark.gpu
def test_render_textured_quad_pixels(renderer_factory, cuda_device: torch.device) -> None:
    """Pins orientation and sampling: output row r is projected row r (no flip), u runs along
    texture columns and v along texture rows (row 0 = v 0, the flipped-texture convention),
    bilinear filtering, zero outside the mesh, per-item M in a batch."""
    size = 16
    texel_col = torch.arange(size, dtype=torch.float32).view(1, size).expand(size, size)
    texel_row = texel_col.t()
    # Channel 0 = texel column, 1 = texel row, 2 = 1: bilinear sampling returns the continuous
    # texel coordinate, u*T - 0.5 and v*T - 0.5.
    texture = torch.stack([texel_col, texel_row, torch.ones(size, size)])[None].repeat(2, 1, 1, 1)
    M, verts, vert_ids, uvs, uv_ids = _quad_scene(cuda_device)
    image = renderer_factory().render(M, verts, vert_ids, uvs, uv_ids, texture.to(cuda_device), (ROWS, COLS))
    assert image.shape == (2, ROWS, COLS, 3)
    image = image.cpu()
    for item, shift in ((0, 0), (1, 4)):
        for row in range(18, 47, 4):
            for col in range(10 + shift, 39 + shift, 4):
                u = (col + 0.5 - 8 - shift) / 32
                v = (row + 0.5 - 16) / 32
                expected = torch.tensor([u * size - 0.5, v * size - 0.5, 1.0])
                torch.testing.assert_close(image[item, row, col], expected, atol=2e-3, rtol=0)
        assert torch.count_nonzero(image[item, :15]) == 0
        assert torch.count_nonzero(image[item, :, : 7 + shift]) == 0
        assert torch.count_nonzero(image[item, 49:]) == 0


@pytest.mark.gpu
def test_shade_broadcasts_a_single_weight_image_and_antialias_passes_vertex_gradients(
    renderer_factory, cuda_device: torch.device
) -> None:
    """Pins the screen-mask path (one (1, 3, T, T) weight image for the whole batch, one
    rasterisation reused) and that antialiasing gives silhouette gradients to vertices."""
    renderer = renderer_factory(antialias=True)
    M, verts, vert_ids, uvs, uv_ids = _quad_scene(cuda_device)
    verts = verts.clone().requires_grad_(True)
    raster = renderer.rasterize(M, verts, vert_ids, (ROWS, COLS))
    weight = renderer.shade(raster, uvs, uv_ids, torch.ones(1, 3, 8, 8, device=cuda_device), antialias=False)
    assert weight.shape == (2, ROWS, COLS, 3)
    weight = weight.detach()
    assert float(weight[0, 30, 20, 0]) == pytest.approx(1.0) and float(weight[0, 2, 2, 0]) == 0.0
    colour = renderer.shade(raster, uvs, uv_ids, torch.ones(2, 3, 8, 8, device=cuda_device))
    colour.sum().backward()
    assert verts.grad is not None and torch.isfinite(verts.grad).all()
    assert torch.count_nonzero(verts.grad) > 0


@pytest.mark.gpu
def test_coverage_is_the_render_of_a_uniform_weight_and_texcoords_are_shared(
    renderer_factory, cuda_device: torch.device
) -> None:
    """Pins the shortcut ``run_net`` takes without --loss_weight_mask: ``Renderer.coverage`` equals
    shading a texture of ones (the reference's screen mask), and shading with precomputed
    ``texcoords`` equals shading without them, values and vertex gradients."""
    renderer = renderer_factory()
    M, verts, vert_ids, uvs, uv_ids = _quad_scene(cuda_device)
    raster = renderer.rasterize(M, verts, vert_ids, (ROWS, COLS))
    ones = renderer.shade(raster, uvs, uv_ids, torch.ones(1, 3, 8, 8, device=cuda_device), antialias=False)
    coverage = renderer.coverage(raster)
    assert coverage.shape == (2, ROWS, COLS, 1) and int(coverage.sum()) > 0
    torch.testing.assert_close(ones, coverage.expand_as(ones), atol=1e-6, rtol=0)

    texture = torch.rand(
        2, 3, 8, 8, device=cuda_device, generator=torch.Generator(cuda_device).manual_seed(0)
    )
    gradients = []
    for shared in (False, True):
        moving = verts.clone().requires_grad_(True)
        raster = renderer.rasterize(M, moving, vert_ids, (ROWS, COLS))
        texcoords = renderer.texcoords(raster, uvs, uv_ids) if shared else None
        image = renderer.shade(raster, uvs, uv_ids, texture, texcoords=texcoords)
        (image * torch.linspace(0, 1, COLS, device=cuda_device)[None, None, :, None]).sum().backward()
        gradients.append((image.detach(), moving.grad))
    torch.testing.assert_close(gradients[0][0], gradients[1][0], atol=0, rtol=0)
    torch.testing.assert_close(gradients[0][1], gradients[1][1])
