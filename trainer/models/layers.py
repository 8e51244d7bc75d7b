"""Weight-normalised layers, the texel-bias upsampling convolution and their initialisation.

These are the building blocks whose parameter names (``weight``, ``bias``, ``g``, ``deconv``)
must match the published Multiface checkpoints (``shared/reference/checkpoint_keys.json``).

Weight normalisation here is the Multiface variant, not ``torch.nn.utils.weight_norm``: the
effective weight is ``weight * g / ||weight||`` where ``||weight||`` is the Frobenius norm of
the WHOLE weight tensor (one scalar) and ``g`` holds one gain per output channel.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2
"""Negative slope of every LeakyReLU in the Multiface models."""


def _normalised_weight(weight: torch.Tensor, g: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Return ``weight * g / ||weight||`` with ``g`` broadcast along ``out_dim``.

    Args:
        weight: Layer weight, any shape, float.
        g: Per-output-channel gains, shape ``(weight.shape[out_dim],)``.
        out_dim: Axis of ``weight`` that indexes output channels.

    Returns:
        Tensor of ``weight``'s shape.
    """
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    # One multiply by a per-channel factor instead of a full-tensor divide: same value, fewer passes.
    return weight * (g / torch.linalg.vector_norm(weight)).view(shape)


class LinearWN(nn.Linear):
    """Fully connected layer with whole-tensor weight normalisation.

    Parameters: ``weight`` (out, in), ``bias`` (out,), ``g`` (out,).
    Input (..., in) float32; output (..., out).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.g = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _normalised_weight(self.weight, self.g, 0), self.bias)


class Conv2dWN(nn.Conv2d):
    """2-D convolution with whole-tensor weight normalisation.

    Parameters: ``weight`` (out, in, k, k), ``bias`` (out,), ``g`` (out,).
    Input (N, in, H, W) float32; output (N, out, H', W').
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=True)
        self.g = nn.Parameter(torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _normalised_weight(self.weight, self.g, 0), self.bias)


class ConvTranspose2dWN(nn.ConvTranspose2d):
    """Transposed 2-D convolution with whole-tensor weight normalisation.

    Parameters: ``weight`` (in, out, k, k), ``bias`` (out,), ``g`` (out,): the output channel
    is dim 1 of a transposed-convolution weight, so ``g`` scales along dim 1.
    Input (N, in, H, W) float32; output (N, out, H', W').
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=True)
        self.g = nn.Parameter(torch.ones(out_channels))

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        padding = cast(tuple[int, ...], self.padding)  # always ints: the constructor takes an int
        output_padding = self._output_padding(
            input, output_size, list(self.stride), list(padding), list(self.kernel_size), 2
        )
        weight = _normalised_weight(self.weight, self.g, 1)
        return F.conv_transpose2d(input, weight, self.bias, self.stride, padding, output_padding)


class TexelBiasConv(nn.Module):
    """Doubles the spatial size of a feature map and adds a learned bias per texel.

    The upsampling is either a 4x4 stride-2 transposed convolution (``deconv`` is a
    :class:`ConvTranspose2dWN`) or, with ``nearest_upsample``, nearest-neighbour x2
    upsampling followed by a 3x3 convolution (``deconv`` is a :class:`Conv2dWN`; the
    ``bilinear`` architecture keeps the seed's name for this). The bias ``bias`` has shape
    (1, out, S, S) with S the output size, or (1, out, 1, 1) with ``per_channel_bias``
    (the ``non`` architecture).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        out_size: Output height and width S (twice the input size).
        nearest_upsample: Use nearest x2 + 3x3 conv instead of a transposed conv.
        per_channel_bias: One bias per channel instead of one per texel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        out_size: int,
        nearest_upsample: bool = False,
        per_channel_bias: bool = False,
    ) -> None:
        super().__init__()
        self.nearest_upsample = nearest_upsample
        self.deconv: nn.Module
        if nearest_upsample:
            self.deconv = Conv2dWN(in_channels, out_channels, 3, 1, 1)
        else:
            self.deconv = ConvTranspose2dWN(in_channels, out_channels, 4, 2, 1)
        bias_size = 1 if per_channel_bias else out_size
        self.bias = nn.Parameter(torch.zeros(1, out_channels, bias_size, bias_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample.

        Args:
            x: (N, in, S/2, S/2) float32.

        Returns:
            (N, out, S, S) float32.
        """
        if self.nearest_upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.deconv(x) + self.bias


def glorot_(module: nn.Module, alpha: float) -> None:
    """Initialise one layer with uniform Glorot, scaled by the LeakyReLU(alpha) gain.

    Applies to ``nn.Linear``, ``nn.Conv2d`` and ``nn.ConvTranspose2d`` (weight-normalised or
    not) and ignores every other module, so it can be passed to ``nn.Module.apply``. The bias
    is zeroed. A stride-2 transposed convolution counts a quarter of its kernel taps in its
    fan (each output texel sees one of four phases) and gets the same kernel in all four
    phases, so it starts as a smooth upsampler rather than a checkerboard. A weight-normalised
    layer gets ``g`` = the weight's norm, so its effective weight equals ``weight`` at start.

    Args:
        module: The layer to initialise, in place.
        alpha: LeakyReLU negative slope for the gain sqrt(2 / (1 + alpha^2)); 1.0 gives gain 1
            for output layers that have no activation after them.
    """
    if isinstance(module, nn.ConvTranspose2d):
        taps = module.kernel_size[0] * module.kernel_size[1] // 4
        fan_sum = (module.in_channels + module.out_channels) * taps
    elif isinstance(module, nn.Conv2d):
        taps = module.kernel_size[0] * module.kernel_size[1]
        fan_sum = (module.in_channels + module.out_channels) * taps
    elif isinstance(module, nn.Linear):
        fan_sum = module.in_features + module.out_features
    else:
        return
    gain = math.sqrt(2.0 / (1.0 + alpha**2))
    bound = gain * math.sqrt(2.0 / fan_sum) * math.sqrt(3.0)
    with torch.no_grad():
        module.weight.uniform_(-bound, bound)
        if module.bias is not None:
            module.bias.zero_()
        if isinstance(module, nn.ConvTranspose2d):
            assert module.stride == (2, 2), "phase tying is defined for stride-2 kernels only"
            phase = module.weight[:, :, 0::2, 0::2].clone()
            module.weight[:, :, 0::2, 1::2] = phase
            module.weight[:, :, 1::2, 0::2] = phase
            module.weight[:, :, 1::2, 1::2] = phase
        if isinstance(module, (LinearWN, Conv2dWN, ConvTranspose2dWN)):
            module.g.fill_(torch.linalg.vector_norm(module.weight).item())


def init_hidden_layers_(module: nn.Module) -> None:
    """Glorot-initialise every layer inside ``module`` for a LeakyReLU(0.2) that follows it."""
    module.apply(lambda layer: glorot_(layer, LEAKY_SLOPE))


def init_output_layer_(layer: nn.Module) -> None:
    """Glorot-initialise one output layer (no activation after it): gain 1."""
    glorot_(layer, 1.0)
