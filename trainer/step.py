"""One forward pass and its losses, the reference's ``run_net`` (reference section 5).

Shared by training, validation, evaluation and visualisation so that every number the
project reports is computed one way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from shards.decode import EntityMetadata
from trainer import losses
from trainer.render import Renderer


@dataclass
class Statistics:
    """Normalisation statistics on the training device.

    Attributes:
        texmean: (1, 3, T, T) float32 mean texture (8-bit scale, flipped, resized to tex_size).
        texstd: texture standard deviation (8-bit scale).
        vertmean: (1, V, 3) float32 mean vertices.
        vertstd: vertex standard deviation.
        loss_weight: (1, 3, H, W) float32 UV-space screen-loss weight image, flipped, max 1.
        uniform_weight: True when ``loss_weight`` is 1 everywhere (no ``--loss_weight_mask``):
            the screen mask is then the render's coverage, without a second texture lookup.
    """

    texmean: torch.Tensor
    texstd: float
    vertmean: torch.Tensor
    vertstd: float
    loss_weight: torch.Tensor
    uniform_weight: bool = False

    @classmethod
    def build(
        cls, meta: EntityMetadata, tex_size: int, device: torch.device, loss_weight_mask: str | None = None
    ) -> Statistics:
        texmean = cv2.resize(meta.texmean, (tex_size, tex_size))
        if loss_weight_mask is None:
            weight = np.ones((tex_size, tex_size, 3), dtype=np.float32)
        else:
            image = cv2.imread(loss_weight_mask)
            if image is None:
                raise FileNotFoundError(f"--loss_weight_mask {loss_weight_mask}: not a readable image")
            # The reference flips the weight image like the textures and scales it to max 1.
            weight = cv2.flip(image, 0).astype(np.float32)
            weight /= max(float(weight.max()), 1e-12)
        return cls(
            texmean=torch.from_numpy(texmean).permute(2, 0, 1)[None].contiguous().to(device),
            texstd=meta.texstd,
            vertmean=torch.from_numpy(meta.vertmean).view(1, -1, 3).to(device),
            vertstd=meta.vertstd,
            loss_weight=torch.from_numpy(weight).permute(2, 0, 1)[None].contiguous().to(device),
            uniform_weight=loss_weight_mask is None,
        )


LOSS_NAMES = ("total_loss", "vert_loss", "tex_loss", "screen_loss", "kl")
"""The losses :func:`run_net` returns, in the order logs and tables print them."""

TENSOR_FIELDS = (
    "M",
    "tex",
    "vert_ids",
    "uvs",
    "uv_ids",
    "avg_tex",
    "view",
    "aligned_verts",
    "photo",
    "mask",
    "cam",
)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated batch's tensors to ``device`` (non-blocking from pinned memory)."""
    return {
        name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
    }


def run_net(
    model: nn.Module,
    batch: dict,
    stats: Statistics,
    *,
    arch: str,
    weights: dict[str, float],
    renderer: Renderer | None = None,
    resolution: tuple[int, int] = (2048, 1334),
    sample: bool = True,
    screen_loss: Callable[..., torch.Tensor] = losses.screen_loss,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Forward one batch and compute the reference losses.

    Args:
        model: a DeepAppearanceVAE or WarpFieldVAE (or its DDP wrapper).
        batch: collated decoded fields on the model's device.
        stats: normalisation statistics.
        arch: the architecture name ("warp" returns five outputs).
        weights: ``lambda_verts``, ``lambda_tex``, ``lambda_screen``, ``lambda_kl``.
        renderer: needed when ``lambda_screen`` > 0.
        resolution: (rows, cols) of the screen-loss render.
        sample: draw z from the posterior (training); False uses its mean.
        screen_loss: :func:`trainer.losses.screen_loss` or a compiled form of it
            (:attr:`trainer.speed.Speedups.screen_loss`); same arguments, same value.

    Returns:
        (losses: ``total_loss``, ``vert_loss``, ``tex_loss``, ``screen_loss``, ``kl`` as 0-d
        tensors; outputs: ``pred_tex`` (N, 3, T, T) in [0, 1] scale, ``pred_verts`` (N, V, 3)
        denormalised, ``pred_screen`` (N, rows, cols, 3) or None, and for warp
        ``unwarped_tex``/``warp_field``).
    """
    avg_tex, verts, view, cams = batch["avg_tex"], batch["aligned_verts"], batch["view"], batch["cam"]
    outputs: dict[str, torch.Tensor | None] = {}
    if arch == "warp":
        pred_tex, pred_verts, unwarped, warp_field, kl = model(avg_tex, verts, view, cams=cams, sample=sample)
        outputs["unwarped_tex"], outputs["warp_field"] = unwarped, warp_field
    else:
        pred_tex, pred_verts, kl = model(avg_tex, verts, view, cams=cams, sample=sample)
    vert_loss = losses.vert_loss(pred_verts, verts)
    pred_verts = pred_verts * stats.vertstd + stats.vertmean
    tex_loss = losses.tex_loss(pred_tex, batch["tex"], batch["mask"], stats.texmean, stats.texstd)
    pred01 = losses.texture_to_unit(pred_tex, stats.texmean, stats.texstd)
    screen = None
    outputs["pred_screen"] = None
    if weights["lambda_screen"] > 0:
        if renderer is None:
            raise RuntimeError("lambda_screen > 0 needs a Renderer (CUDA + nvdiffrast)")
        # One rasterisation and one uv interpolation serve the image and the mask (the
        # reference renders twice); a uniform weight image renders to the coverage itself.
        raster = renderer.rasterize(batch["M"], pred_verts, batch["vert_ids"], resolution)
        texcoords = renderer.texcoords(raster, batch["uvs"], batch["uv_ids"])
        pred_screen = renderer.shade(raster, batch["uvs"], batch["uv_ids"], pred01, texcoords=texcoords)
        if stats.uniform_weight:
            screen_mask = renderer.coverage(raster)
        else:
            screen_mask = renderer.shade(
                raster, batch["uvs"], batch["uv_ids"], stats.loss_weight, antialias=False, texcoords=texcoords
            )
        screen = screen_loss(pred_screen, batch["photo"], screen_mask, stats.texstd)
        outputs["pred_screen"] = pred_screen
    total = losses.total_loss(vert_loss, tex_loss, screen, kl, **weights)
    outputs["pred_verts"], outputs["pred_tex"] = pred_verts, pred01
    return (
        {
            "total_loss": total,
            "vert_loss": vert_loss,
            "tex_loss": tex_loss,
            "screen_loss": screen if screen is not None else torch.zeros((), device=total.device),
            "kl": kl,
        },
        outputs,
    )


def read_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's losses on the host with one device-to-host copy (one wait), not one per loss."""
    stacked = torch.stack([losses[name].detach().float() for name in LOSS_NAMES])
    return dict(zip(LOSS_NAMES, stacked.tolist(), strict=True))
