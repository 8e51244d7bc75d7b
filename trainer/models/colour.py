"""Per-camera colour correction of a decoded texture (gain and offset per RGB channel).

Camera 0 in KRT order is the anchor: its gain is fixed at 1 and its offset at 0, so the
model's colours are those of camera 0 and every other camera learns how it differs.
"""

from __future__ import annotations

import torch
from torch import nn


class ColourCorrection(nn.Module):
    """``out = texture * gain[camera] + offset[camera]``, camera 0 fixed at gain 1, offset 0.

    State (names as in the published checkpoints): ``weight_anchor`` and ``bias_anchor``
    (1, 3, 1, 1) buffers holding camera 0's fixed gain and offset; ``weight`` and ``bias``
    (num_cameras - 1, 3, 1, 1) parameters for cameras 1..num_cameras-1.

    Args:
        num_cameras: Number of cameras, counting the anchor (>= 1).
    """

    weight_anchor: torch.Tensor
    bias_anchor: torch.Tensor

    def __init__(self, num_cameras: int) -> None:
        super().__init__()
        if num_cameras < 1:
            raise ValueError(f"num_cameras must be >= 1 (camera 0 is the anchor), got {num_cameras}")
        # Buffers, not parameters: the anchor must never reach an optimiser (weight decay or a
        # stray requires_grad would move it). They are still saved in the state dict.
        self.register_buffer("weight_anchor", torch.ones(1, 3, 1, 1))
        self.register_buffer("bias_anchor", torch.zeros(1, 3, 1, 1))
        self.weight = nn.Parameter(torch.ones(num_cameras - 1, 3, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_cameras - 1, 3, 1, 1))

    @property
    def num_cameras(self) -> int:
        """Number of cameras, anchor included."""
        return self.weight.shape[0] + 1

    def forward(self, texture: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """Correct each texture for the camera it is compared with.

        Args:
            texture: (N, 3, H, W) float32, normalised texture.
            camera: (N,) int64 camera index in KRT order, on ``texture``'s device.

        Returns:
            (N, 3, H, W) float32.
        """
        gains = torch.cat([self.weight_anchor, self.weight], dim=0)
        offsets = torch.cat([self.bias_anchor, self.bias], dim=0)
        return texture * gains[camera] + offsets[camera]
