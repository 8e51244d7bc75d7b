"""Image grids for people: photo, render, predicted and true texture, with the display gamma.

The reference's visualisation brightens linear captures before display: per-channel scale
(1.4, 1.1, 1.6) / 1.1, black level 3/255, gamma 2.0, an offset of -15/255, clamped. Only
pictures get it; losses never do.
"""

from __future__ import annotations

import numpy as np
import torch

GAMMA = 2.0
BLACK = 3.0 / 255.0
COLOUR_SCALE = (1.4, 1.1, 1.6)


def display_gamma(image: torch.Tensor) -> torch.Tensor:
    """Apply the reference display curve.

    Args:
        image: (..., 3) float tensor in [0, 1] scale, channels last.

    Returns:
        Same shape, float, clamped to [0, 1] for saving.
    """
    scale = torch.tensor(COLOUR_SCALE, dtype=image.dtype, device=image.device) / 1.1
    lifted = torch.clamp(image * scale - BLACK, 0, 2) * (0.95 / (1 - BLACK))
    return torch.clamp(lifted ** (1.0 / GAMMA) - 15.0 / 255.0, 0, 1)


def texture_image(texture01: torch.Tensor) -> torch.Tensor:
    """(3, T, T) flipped texture in [0, 1] -> (T, T, 3) upright image for display."""
    return torch.flip(texture01.permute(1, 2, 0), dims=[0])


def _fit(image: torch.Tensor, rows: int) -> torch.Tensor:
    """Resize (H, W, 3) to ``rows`` high, keeping the aspect ratio."""
    cols = max(1, round(image.shape[1] * rows / image.shape[0]))
    resized = torch.nn.functional.interpolate(
        image.permute(2, 0, 1)[None], size=(rows, cols), mode="bilinear"
    )
    return resized[0].permute(1, 2, 0)


def grid(
    batch: dict, outputs: dict, stats_texmean: torch.Tensor, texstd: float, rows: int = 256
) -> np.ndarray:
    """One row for the first sample: photo | render (if any) | predicted texture | true texture.

    Returns:
        (rows, W, 3) uint8 image, display gamma applied.
    """
    with torch.no_grad():
        panels = []
        if "photo" in batch:
            panels.append(batch["photo"][0].float())
        if outputs.get("pred_screen") is not None:
            panels.append(outputs["pred_screen"][0].float())
        panels.append(texture_image(outputs["pred_tex"][0].float()))
        true01 = (batch["tex"][0] * texstd + stats_texmean[0]) / 255.0
        panels.append(texture_image(true01.float()))
        row = torch.cat([_fit(display_gamma(panel.clamp(0, 1)), rows) for panel in panels], dim=1)
        return (row.cpu().numpy() * 255).round().astype(np.uint8)
