"""The deep appearance VAE of Multiface: texture+mesh encoder, view-conditioned decoder.

Architectures ``base``, ``res``, ``non`` and ``bilinear`` are all :class:`DeepAppearanceVAE`
(reference section 6); ``warp`` adds a warp-field decoder (:mod:`trainer.models.warp`).
Module and parameter names follow the published checkpoints.

Texture sizes: any multiple of 256. The encoder halves the size eight times (flatten
128 * (T/256)^2 features: 2048 at T=1024, 512 at 512, 128 at 256) and the decoder starts at
(T/256) x (T/256) and doubles it eight times.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.losses import kl_divergence
from trainer.models.colour import ColourCorrection
from trainer.models.layers import (
    LEAKY_SLOPE,
    Conv2dWN,
    LinearWN,
    TexelBiasConv,
    init_hidden_layers_,
    init_output_layer_,
)

ENCODER_CHANNELS = ((3, 16, 16), (16, 32, 32), (32, 64, 64), (64, 128, 128))
"""(in, hidden, out) channels of the four texture-encoder blocks."""

MESH_CODE_SIZE = 256
TEXTURE_CODE_SIZE = 256
VIEW_CODE_SIZE = 8
MEAN_SCALE = 0.1
LOGSTD_SCALE = 0.01


def check_tex_size(tex_size: int) -> int:
    """Return the decoder's start size T/256, or raise ValueError for an unsupported size."""
    if tex_size < 256 or tex_size % 256 != 0:
        raise ValueError(
            f"tex_size must be a positive multiple of 256 (e.g. 256, 512 or 1024; published "
            f"models use 1024), got {tex_size}; resize the textures to such a size"
        )
    return tex_size // 256


class DownsampleBlock(nn.Module):
    """Two stride-2 4x4 convolutions (``conv1``, ``conv2``), LeakyReLU after each.

    With ``residual``, a 3x3 convolution follows each (``res1``, ``res2``):
    ``h = act(res(h) + h)``. Input (N, in, S, S) -> output (N, out, S/4, S/4), float32.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = Conv2dWN(in_channels, hidden_channels, 4, 2, 1)
        self.conv2 = Conv2dWN(hidden_channels, out_channels, 4, 2, 1)
        if residual:
            self.res1 = Conv2dWN(hidden_channels, hidden_channels, 3, 1, 1)
            self.res2 = Conv2dWN(out_channels, out_channels, 3, 1, 1)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))
        if self.residual:
            h = self.act(self.res1(h) + h)
        h = self.act(self.conv2(h))
        if self.residual:
            h = self.act(self.res2(h) + h)
        return h


class UpsampleBlock(nn.Module):
    """Two texel-bias upsampling convolutions (``conv1``, ``conv2``), each doubling the size.

    LeakyReLU follows ``conv1`` and, unless ``last``, ``conv2``. With ``residual`` a 3x3
    convolution follows each (``res1``, ``res2``): ``h = act(res(h) + h)`` (no act when last).
    Input (N, in, S, S) -> output (N, out, 4S, 4S), float32.

    Args:
        in_channels: Input channels.
        hidden_channels: Channels after ``conv1``.
        out_channels: Output channels.
        in_size: Input height and width S (sets the texel-bias sizes 2S and 4S).
        last: No activation after ``conv2`` (the block produces the output texture).
        residual: Add the residual 3x3 convolutions (``res`` architecture).
        nearest_upsample: Nearest x2 + 3x3 conv instead of transposed convs (``bilinear``).
        per_channel_bias: Per-channel instead of per-texel biases (``non``).
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        in_size: int,
        last: bool = False,
        residual: bool = False,
        nearest_upsample: bool = False,
        per_channel_bias: bool = False,
    ) -> None:
        super().__init__()
        self.last = last
        self.residual = residual
        options = {"nearest_upsample": nearest_upsample, "per_channel_bias": per_channel_bias}
        self.conv1 = TexelBiasConv(in_channels, hidden_channels, 2 * in_size, **options)
        self.conv2 = TexelBiasConv(hidden_channels, out_channels, 4 * in_size, **options)
        if residual:
            self.res1 = Conv2dWN(hidden_channels, hidden_channels, 3, 1, 1)
            self.res2 = Conv2dWN(out_channels, out_channels, 3, 1, 1)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))
        if self.residual:
            h = self.act(self.res1(h) + h)
        h = self.conv2(h)
        if not self.last:
            h = self.act(h)
        if self.residual:
            h = self.res2(h) + h
            if not self.last:
                h = self.act(h)
        return h


class TextureEncoder(nn.Module):
    """Four :class:`DownsampleBlock` (``downsample``): (N, 3, T, T) -> (N, 128 * (T/256)^2)."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.downsample = nn.Sequential(*(DownsampleBlock(*c, residual=residual) for c in ENCODER_CHANNELS))

    def forward(self, texture: torch.Tensor) -> torch.Tensor:
        return self.downsample(texture).flatten(1)


class Encoder(nn.Module):
    """Encodes the average texture and the mesh into a posterior (mean, logstd).

    Args:
        tex_size: Texture height and width T (a multiple of 256).
        mesh_inp_size: Flattened mesh size, 3 * number of vertices.
        n_latent: Latent size L.
        residual: Residual texture encoder (``res``).
    """

    def __init__(self, tex_size: int, mesh_inp_size: int, n_latent: int, residual: bool = False) -> None:
        super().__init__()
        start = check_tex_size(tex_size)
        self.n_latent = n_latent
        self.texture_encoder = TextureEncoder(residual)
        self.texture_fc = LinearWN(ENCODER_CHANNELS[-1][2] * start * start, TEXTURE_CODE_SIZE)
        self.mesh_fc = LinearWN(mesh_inp_size, MESH_CODE_SIZE)
        self.fc = LinearWN(TEXTURE_CODE_SIZE + MESH_CODE_SIZE, 2 * n_latent)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        init_hidden_layers_(self)
        init_output_layer_(self.fc)

    def forward(self, texture: torch.Tensor, mesh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: texture (N, 3, T, T) float32 ``avg_tex``; mesh (N, 3V) float32.

        Returns:
            mean and logstd, each (N, L) float32, unscaled (the VAE scales them).
        """
        texture_code = self.act(self.texture_fc(self.texture_encoder(texture)))
        mesh_code = self.act(self.mesh_fc(mesh))
        latent = self.fc(torch.cat([texture_code, mesh_code], dim=1))
        return latent[:, : self.n_latent], latent[:, self.n_latent :]


class TextureDecoder(nn.Module):
    """Four :class:`UpsampleBlock` (``upsample``): (N, L, T/256, T/256) -> (N, 3, T, T)."""

    def __init__(
        self, tex_size: int, n_latent: int, residual: bool, nearest_upsample: bool, per_channel_bias: bool
    ) -> None:
        super().__init__()
        start = check_tex_size(tex_size)
        channels = ((n_latent, n_latent, 64), (64, 64, 32), (32, 32, 16), (16, 16, 3))
        options = {
            "residual": residual,
            "nearest_upsample": nearest_upsample,
            "per_channel_bias": per_channel_bias,
        }
        self.upsample = nn.Sequential(
            *(
                UpsampleBlock(*c, in_size=start * 4**i, last=i == len(channels) - 1, **options)
                for i, c in enumerate(channels)
            )
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.upsample(code)


class Decoder(nn.Module):
    """Decodes a latent code and a view direction into a texture and a mesh.

    Args:
        tex_size: Texture height and width T (a multiple of 256).
        mesh_inp_size: Flattened mesh size, 3 * number of vertices.
        n_latent: Latent size L.
        residual: Residual texture decoder (``res``).
        nearest_upsample: Nearest x2 + 3x3 conv upsampling (``bilinear``).
        per_channel_bias: Per-channel instead of per-texel biases (``non``).
    """

    def __init__(
        self,
        tex_size: int,
        mesh_inp_size: int,
        n_latent: int,
        residual: bool = False,
        nearest_upsample: bool = False,
        per_channel_bias: bool = False,
    ) -> None:
        super().__init__()
        self.start_size = check_tex_size(tex_size)
        self.n_latent = n_latent
        self.texture_decoder = TextureDecoder(
            tex_size, n_latent, residual, nearest_upsample, per_channel_bias
        )
        self.view_fc = LinearWN(3, VIEW_CODE_SIZE)
        self.z_fc = LinearWN(n_latent, TEXTURE_CODE_SIZE)
        self.mesh_fc = LinearWN(TEXTURE_CODE_SIZE, mesh_inp_size)
        self.texture_fc = LinearWN(TEXTURE_CODE_SIZE + VIEW_CODE_SIZE, n_latent * self.start_size**2)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        init_hidden_layers_(self)
        init_output_layer_(self.mesh_fc)
        output_block = self.texture_decoder.upsample[-1]
        assert isinstance(output_block, UpsampleBlock)
        init_output_layer_(output_block.conv2.deconv)

    def forward(self, z: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: z (N, L) float32 latent code; view (N, 3) float32 unit view direction.

        Returns:
            texture (N, 3, T, T) float32, normalised; mesh (N, 3V) float32, normalised.
        """
        view_code = self.act(self.view_fc(view))
        z_code = self.act(self.z_fc(z))
        texture_code = self.act(self.texture_fc(torch.cat([view_code, z_code], dim=1)))
        texture_code = texture_code.view(-1, self.n_latent, self.start_size, self.start_size)
        return self.texture_decoder(texture_code), self.mesh_fc(z_code)


def sample_latent(
    mean: torch.Tensor, logstd: torch.Tensor, sample: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale the encoder's outputs, compute the KL term and draw z.

    Args:
        mean: (N, L) float32 raw encoder mean.
        logstd: (N, L) float32 raw encoder logstd.
        sample: Draw ``z = mean + exp(logstd) * eps``; if False, ``z = mean``.

    Returns:
        z (N, L), kl (0-d), scaled mean (N, L), all float32.
    """
    mean = mean * MEAN_SCALE
    logstd = logstd * LOGSTD_SCALE
    kl = kl_divergence(mean, logstd)
    z = mean + torch.exp(logstd) * torch.randn_like(mean) if sample else mean
    return z, kl, mean


class DeepAppearanceVAE(nn.Module):
    """Deep appearance VAE: architectures ``base``, ``res``, ``non`` and ``bilinear``.

    Submodules ``enc`` (:class:`Encoder`), ``dec`` (:class:`Decoder`) and ``cc``
    (:class:`~trainer.models.colour.ColourCorrection`).

    Args:
        tex_size: Texture height and width T (a multiple of 256; published: 1024).
        mesh_inp_size: Flattened mesh size, 3 * number of vertices (published: 21918).
        n_latent: Latent size L.
        n_cams: Number of cameras for colour correction.
        res: Residual 3x3 convolutions in encoder and decoder (``res``).
        non: Per-channel instead of per-texel decoder biases (``non``).
        bilinear: Nearest x2 + 3x3 conv instead of transposed convs (``bilinear``).
    """

    def __init__(
        self,
        tex_size: int,
        mesh_inp_size: int,
        n_latent: int = 256,
        n_cams: int = 38,
        res: bool = False,
        non: bool = False,
        bilinear: bool = False,
    ) -> None:
        super().__init__()
        self.enc = Encoder(tex_size, mesh_inp_size, n_latent, residual=res)
        self.dec = Decoder(
            tex_size, mesh_inp_size, n_latent, residual=res, nearest_upsample=bilinear, per_channel_bias=non
        )
        self.cc = ColourCorrection(n_cams)

    def forward(
        self,
        avgtex: torch.Tensor,
        mesh: torch.Tensor,
        view: torch.Tensor,
        cams: torch.Tensor | None = None,
        *,
        sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, sample and decode one batch.

        Args:
            avgtex: (N, 3, T, T) float32 ``avg_tex`` (normalised, flipped).
            mesh: (N, V, 3) float32 ``aligned_verts``.
            view: (N, 3) float32 ``view`` direction.
            cams: (N,) int64 ``cam`` indices; None skips colour correction.
            sample: Draw z from the posterior (the seed does so in training and testing);
                False uses the posterior mean, for deterministic evaluation.

        Returns:
            ``(tex, mesh, kl)``: tex (N, 3, T, T) float32 normalised texture, colour
            corrected for ``cams``; mesh (N, V, 3) float32 normalised vertices; kl 0-d.
        """
        num_vertices = mesh.shape[1]
        mean, logstd = self.enc(avgtex, mesh.reshape(mesh.shape[0], -1))
        z, kl, _ = sample_latent(mean, logstd, sample)
        tex, verts = self.dec(z, view)
        if cams is not None:
            tex = self.cc(tex, cams)
        return tex, verts.view(-1, num_vertices, 3), kl

    def get_model_params(self) -> list[nn.Parameter]:
        """Parameters of the first optimiser (encoder and decoder; the seed's name)."""
        return [*self.enc.parameters(), *self.dec.parameters()]

    def get_cc_params(self) -> list[nn.Parameter]:
        """Parameters of the colour-correction optimiser (the seed's name)."""
        return list(self.cc.parameters())
