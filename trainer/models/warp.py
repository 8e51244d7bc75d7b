"""The ``warp`` architecture: a deep appearance VAE whose texture is resampled by a warp field.

A second decoder turns the latent code into a 2-channel offset field at texture size; the
decoded texture is sampled at identity-grid + offset (``grid_sample``), and colour
correction applies to the warped texture (reference section 6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.colour import ColourCorrection
from trainer.models.layers import LEAKY_SLOPE, LinearWN, init_hidden_layers_, init_output_layer_
from trainer.models.vae import Decoder, Encoder, UpsampleBlock, check_tex_size, sample_latent

WARP_CHANNELS = ((256, 128, 128), (128, 128, 64), (64, 64, 32), (32, 32, 16))
"""(in, hidden, out) channels of the four warp upsampling blocks, from a 2x2 start."""

WARP_START_SIZE = 2


def identity_grid(tex_size: int) -> torch.Tensor:
    """Sampling grid that maps each texel to itself, in ``grid_sample``'s [-1, 1] coordinates.

    Args:
        tex_size: Grid height and width T.

    Returns:
        (1, 2, T, T) float32: channel 0 is x (varies along columns), channel 1 is y (rows),
        both ``linspace(-1, 1, T)``.
    """
    coords = torch.linspace(-1.0, 1.0, tex_size, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([x, y])[None]


class WarpFieldDecoder(nn.Module):
    """Decodes a latent code into a sampling grid and warps a texture with it.

    Submodules: ``mlp`` (LinearWN L->256, act, LinearWN 256->1024, act), ``upsample``
    (four :class:`~trainer.models.vae.UpsampleBlock` from 2x2 to 512x512, bilinear resize to
    T, plain 3x3 ``nn.Conv2d`` to 2 channels) and the buffer ``normal_grid``
    (:func:`identity_grid`).

    Args:
        tex_size: Texture height and width T (a multiple of 256).
        n_latent: Latent size L.
    """

    def __init__(self, tex_size: int, n_latent: int) -> None:
        super().__init__()
        check_tex_size(tex_size)
        self.tex_size = tex_size
        self.mlp = nn.Sequential(
            LinearWN(n_latent, 256),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            LinearWN(256, WARP_CHANNELS[0][0] * WARP_START_SIZE**2),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )
        blocks = [UpsampleBlock(*c, in_size=WARP_START_SIZE * 4**i) for i, c in enumerate(WARP_CHANNELS)]
        self.upsample = nn.Sequential(
            *blocks,
            nn.Upsample(size=(tex_size, tex_size), mode="bilinear", align_corners=False),
            nn.Conv2d(WARP_CHANNELS[-1][2], 2, 3, 1, 1),
        )
        self.register_buffer("normal_grid", identity_grid(tex_size))
        init_hidden_layers_(self)
        init_output_layer_(self.upsample[-1])

    def forward(self, z: torch.Tensor, texture: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp ``texture`` by the field decoded from ``z``.

        Args:
            z: (N, L) float32 latent code.
            texture: (N, C, T, T) float32 texture to resample.

        Returns:
            warped (N, C, T, T) float32; grid (N, T, T, 2) float32, the absolute sampling
            positions (identity + offset / T) in ``grid_sample`` coordinates, x first.
        """
        features = self.mlp(z).view(-1, WARP_CHANNELS[0][0], WARP_START_SIZE, WARP_START_SIZE)
        grid = self.upsample(features) / self.tex_size + self.normal_grid
        grid = grid.permute(0, 2, 3, 1).contiguous()
        # align_corners=False is what the published models were trained with (torch's default).
        warped = F.grid_sample(texture, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped, grid


class WarpFieldVAE(nn.Module):
    """The ``warp`` architecture: :class:`~trainer.models.vae.DeepAppearanceVAE` + warp field.

    Submodules ``enc``, ``dec``, ``warp`` (:class:`WarpFieldDecoder`) and ``cc``.

    Args:
        tex_size: Texture height and width T (a multiple of 256; published: 1024).
        mesh_inp_size: Flattened mesh size, 3 * number of vertices (published: 21918).
        z_dim: Latent size L.
        n_cams: Number of cameras for colour correction.
    """

    def __init__(self, tex_size: int, mesh_inp_size: int, z_dim: int = 256, n_cams: int = 38) -> None:
        super().__init__()
        # cc first: the published checkpoints list their keys in this order.
        self.cc = ColourCorrection(n_cams)
        self.enc = Encoder(tex_size, mesh_inp_size, z_dim)
        self.dec = Decoder(tex_size, mesh_inp_size, z_dim)
        self.warp = WarpFieldDecoder(tex_size, z_dim)

    def forward(
        self,
        avgtex: torch.Tensor,
        mesh: torch.Tensor,
        view: torch.Tensor,
        cams: torch.Tensor | None = None,
        *,
        sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, sample, decode and warp one batch.

        Args:
            avgtex: (N, 3, T, T) float32 ``avg_tex`` (normalised, flipped).
            mesh: (N, V, 3) float32 ``aligned_verts``.
            view: (N, 3) float32 ``view`` direction.
            cams: (N,) int64 ``cam`` indices; None skips colour correction.
            sample: Draw z from the posterior (seed behaviour); False uses the mean.

        Returns:
            ``(warped_tex, mesh, unwarped_tex, warp_field, kl)``: warped_tex (N, 3, T, T)
            normalised and colour corrected; mesh (N, V, 3); unwarped_tex (N, 3, T, T) the
            decoder's texture before warping (no colour correction); warp_field (N, T, T, 2)
            the sampling grid; kl 0-d. All float32.
        """
        num_vertices = mesh.shape[1]
        mean, logstd = self.enc(avgtex, mesh.reshape(mesh.shape[0], -1))
        z, kl, _ = sample_latent(mean, logstd, sample)
        unwarped, verts = self.dec(z, view)
        warped, grid = self.warp(z, unwarped)
        if cams is not None:
            warped = self.cc(warped, cams)
        return warped, verts.view(-1, num_vertices, 3), unwarped, grid, kl

    def get_model_params(self) -> list[nn.Parameter]:
        """Parameters of the first optimiser (encoder, decoder, warp; the seed's name)."""
        return [*self.enc.parameters(), *self.dec.parameters(), *self.warp.parameters()]

    def get_cc_params(self) -> list[nn.Parameter]:
        """Parameters of the colour-correction optimiser (the seed's name)."""
        return list(self.cc.parameters())
