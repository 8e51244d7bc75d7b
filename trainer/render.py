"""Render a predicted texture into a camera's photo for the screen loss (reference section 4).

:func:`project` is plain torch (runs and is tested on the CPU). :class:`Renderer` rasterises
with nvdiffrast's CUDA rasteriser and is the only place that imports nvdiffrast, lazily, so
the rest of the trainer imports and runs without it. Works with NVIDIA's nvdiffrast 0.4 and
with PyPI's ``diffrp-nvdiffrast`` 0.3.3.1, whose JIT-built plugin cannot be imported under
torch >= 2.9 without :func:`_with_plugin_on_path`.

Typical use in a training step (one rasterisation, two textures)::

    renderer = Renderer(device, antialias=True)
    raster = renderer.rasterize(M, verts, vert_ids, (2048, 1334))
    texcoords = renderer.texcoords(raster, uvs, uv_ids)               # shared by both textures
    image = renderer.shade(raster, uvs, uv_ids, pred_tex01, texcoords=texcoords)  # (N, 2048, 1334, 3)
    weight = renderer.shade(raster, uvs, uv_ids, loss_weight, antialias=False, texcoords=texcoords)
    # A uniform weight image renders to the coverage itself: renderer.coverage(raster).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")

NEEDS_CUDA = (
    "the screen loss (lambda_screen > 0) and rendering need a CUDA GPU and nvdiffrast "
    "(`pip install diffrp-nvdiffrast`, or NVIDIA's nvdiffrast >= 0.3); {reason}. "
    "Set lambda_screen to 0 to train without rendering."
)
_PLUGIN_PATTERN = re.compile(r"No module named '?(nvdiffrast_plugin[\w.]*)'?")


def project(verts: torch.Tensor, M: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Project head-frame vertices to nvdiffrast clip space (the seed's convention).

    For each vertex p = M [v; 1]; clip x = p0 / (p2 cols/2) - 1, y = p1 / (p2 rows/2) - 1,
    z = p2 / (max over the mesh's vertices of p2), w = 1. Pixel column c (row r) thus has its
    centre at x = (c + 0.5) / (cols/2) - 1 and output row r matches photo row r (no flip).

    Args:
        verts: (N, V, 3) float32 vertex positions in the head frame (denormalised).
        M: (N, 3, 4) float32 ``M`` = K [R_C R_f | R_C t_f + t_C], same device.
        rows: Image height in pixels (2048 for Multiface photos).
        cols: Image width in pixels (1334).

    Returns:
        (N, V, 4) float32 clip-space positions.
    """
    p = torch.einsum("nij,nvj->nvi", M[:, :, :3], verts) + M[:, None, :, 3]
    depth = p[..., 2]
    x = p[..., 0] / (depth * (cols / 2.0)) - 1.0
    y = p[..., 1] / (depth * (rows / 2.0)) - 1.0
    z = depth / depth.max(dim=1, keepdim=True).values
    return torch.stack([x, y, z, torch.ones_like(z)], dim=-1)


def _plugin_name(error: ModuleNotFoundError) -> str | None:
    """Name of the nvdiffrast JIT plugin that ``error`` failed to import, or None."""
    if error.name and error.name.startswith("nvdiffrast_plugin"):
        return error.name
    match = _PLUGIN_PATTERN.search(str(error))
    return match.group(1) if match else None


def _with_plugin_on_path(create: Callable[[], _T]) -> _T:
    """Call ``create``; if the JIT plugin was built but cannot be imported, fix sys.path and retry.

    nvdiffrast 0.3.x builds its plugin with ``torch.utils.cpp_extension.load`` and then does
    ``importlib.import_module(name)``. Since torch 2.9 ``load`` no longer leaves the build
    folder importable, so that import fails with "No module named nvdiffrast_plugin_..." right
    after a successful build. The folder is where torch put it:
    ``torch.utils.cpp_extension._get_build_directory(name, verbose)``.
    """
    try:
        return create()
    except ModuleNotFoundError as error:
        plugin = _plugin_name(error)
        if plugin is None:
            raise
        from torch.utils import cpp_extension

        build_dir = cpp_extension._get_build_directory(plugin, False)
        if build_dir in sys.path:
            raise
        sys.path.insert(0, build_dir)
        importlib.invalidate_caches()
        return create()


def _import_nvdiffrast() -> ModuleType:
    """Import ``nvdiffrast.torch`` or raise RuntimeError saying what the screen loss needs."""
    if not torch.cuda.is_available():
        raise RuntimeError(NEEDS_CUDA.format(reason="torch sees no CUDA device"))
    try:
        import nvdiffrast.torch as dr
    except ImportError as error:
        raise RuntimeError(NEEDS_CUDA.format(reason=f"nvdiffrast cannot be imported ({error})")) from error
    return dr


def _shared_topology(indices: torch.Tensor, name: str) -> torch.Tensor:
    """(F, 3) int32 contiguous triangle indices from (F, 3) or batched (N, F, 3) ones."""
    if indices.dim() == 3:
        # The data loader batches the topology; it is the same mesh for every sample.
        indices = indices[0]
    if indices.dim() != 2 or indices.shape[1] != 3:
        raise ValueError(f"{name} must have shape (F, 3) or (N, F, 3), got {tuple(indices.shape)}")
    return indices.to(torch.int32).contiguous()


@dataclass(frozen=True)
class Rasterization:
    """One rasterised batch, reusable for several textures.

    Attributes:
        rast: (N, rows, cols, 4) float32 nvdiffrast output (u, v, z/w, triangle id + 1).
        clip: (N, V, 4) float32 clip-space vertices from :func:`project`.
        triangles: (F, 3) int32 vertex indices.
    """

    rast: torch.Tensor
    clip: torch.Tensor
    triangles: torch.Tensor


class Renderer:
    """Differentiable textured-mesh renderer on nvdiffrast's CUDA rasteriser.

    Args:
        device: CUDA device for the rasteriser context (default: the current one).
        antialias: Run ``nvdiffrast.antialias`` on shaded images, so silhouettes pass
            gradients to vertex positions (the seed does not; off reproduces it).

    Raises:
        RuntimeError: Without a CUDA device or without nvdiffrast, naming what is missing.
    """

    def __init__(self, device: torch.device | str | int | None = None, antialias: bool = False) -> None:
        self._dr = _import_nvdiffrast()
        self.antialias = antialias
        self.context: Any = _with_plugin_on_path(lambda: self._dr.RasterizeCudaContext(device=device))

    def rasterize(
        self, M: torch.Tensor, verts: torch.Tensor, vert_ids: torch.Tensor, resolution: Sequence[int]
    ) -> Rasterization:
        """Project and rasterise a batch of meshes.

        Args:
            M: (N, 3, 4) float32 projection matrices, CUDA.
            verts: (N, V, 3) float32 vertex positions in the head frame (denormalised), CUDA.
            vert_ids: (F, 3) or (N, F, 3) integer ``vert_ids``, 0-based, same mesh for all.
            resolution: (rows, cols) of the output image, at most 2048 each.

        Returns:
            A :class:`Rasterization` for :meth:`shade`.
        """
        rows, cols = int(resolution[0]), int(resolution[1])
        clip = project(verts.float(), M.float(), rows, cols).contiguous()
        triangles = _shared_topology(vert_ids, "vert_ids")
        rast, _ = self._dr.rasterize(self.context, clip, triangles, resolution=[rows, cols])
        return Rasterization(rast=rast, clip=clip, triangles=triangles)

    def texcoords(self, raster: Rasterization, uvs: torch.Tensor, uv_ids: torch.Tensor) -> torch.Tensor:
        """Per-pixel texture coordinates of a rasterised batch, reusable by several :meth:`shade` calls.

        Args:
            raster: From :meth:`rasterize`.
            uvs: (Nuv, 2) or (N, Nuv, 2) float32 ``uvs`` in [0, 1], CUDA.
            uv_ids: (F, 3) or (N, F, 3) integer ``uv_ids``, 0-based.

        Returns:
            (N, rows, cols, 2) float32 interpolated uvs (differentiable in the vertex positions).
        """
        uv = uvs if uvs.dim() == 3 else uvs[None]
        uv_triangles = _shared_topology(uv_ids, "uv_ids")
        texcoords, _ = self._dr.interpolate(uv.float().contiguous(), raster.rast, uv_triangles)
        return texcoords

    @staticmethod
    def coverage(raster: Rasterization) -> torch.Tensor:
        """(N, rows, cols, 1) float32: 1 where a triangle covers the pixel, else 0.

        It equals :meth:`shade` of a texture that is 1 everywhere (without antialiasing), the
        screen loss's mask when no weight image is given, for one texture lookup less.
        """
        return torch.clamp(raster.rast[..., 3:], 0.0, 1.0)

    def shade(
        self,
        raster: Rasterization,
        uvs: torch.Tensor,
        uv_ids: torch.Tensor,
        texture: torch.Tensor,
        antialias: bool | None = None,
        texcoords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Texture a rasterised batch: interpolate uvs, sample bilinearly, mask by coverage.

        Args:
            raster: From :meth:`rasterize`.
            uvs: (Nuv, 2) or (N, Nuv, 2) float32 ``uvs`` in [0, 1], CUDA.
            uv_ids: (F, 3) or (N, F, 3) integer ``uv_ids``, 0-based.
            texture: (N or 1, C, T, T) float32 texture, CHW, vertically flipped as the
                dataset's textures are (row 0 is v = 0); e.g. a predicted texture in [0, 1]
                scale, or the UV-space loss weight image for the screen mask. A batch of 1
                is used for every image (nvdiffrast broadcasts it; no copy per sample).
            antialias: Override the renderer's ``antialias`` for this call.
            texcoords: :meth:`texcoords` of this raster, when several textures share it.

        Returns:
            (N, rows, cols, C) float32; zero where no triangle covers the pixel.
        """
        dr = self._dr
        if texcoords is None:
            texcoords = self.texcoords(raster, uvs, uv_ids)
        texels = texture.float().permute(0, 2, 3, 1).contiguous()
        colour = dr.texture(texels, texcoords, filter_mode="linear")
        colour = colour * self.coverage(raster)
        if self.antialias if antialias is None else antialias:
            colour = dr.antialias(colour.contiguous(), raster.rast, raster.clip, raster.triangles)
        return colour

    def render(
        self,
        M: torch.Tensor,
        verts: torch.Tensor,
        vert_ids: torch.Tensor,
        uvs: torch.Tensor,
        uv_ids: torch.Tensor,
        texture: torch.Tensor,
        resolution: Sequence[int],
    ) -> torch.Tensor:
        """:meth:`rasterize` then :meth:`shade`; arguments as there. Returns (N, rows, cols, C)."""
        return self.shade(self.rasterize(M, verts, vert_ids, resolution), uvs, uv_ids, texture)
