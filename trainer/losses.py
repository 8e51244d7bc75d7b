"""Training losses of the Multiface deep appearance models (reference section 5).

Units matter when numbers are reported or compared with the seed's published ones:

* ``vert_loss`` is in normalised vertex units ((v - vertmean) / vertstd).
* ``tex_loss`` and ``screen_loss`` are 8-bit-scale squared errors divided by texstd^2, i.e.
  in normalised texture units; multiply by texstd^2 for a plain 8-bit-scale MSE (the seed's
  test script reports that as ``denorm_tex_loss``).
* ``kl`` is per latent dimension (a mean, not a sum).
"""

from __future__ import annotations

import torch

EIGHT_BIT_SQUARED = 255.0**2


def texture_to_unit(texture: torch.Tensor, tex_mean: torch.Tensor, tex_std: float) -> torch.Tensor:
    """Undo texture normalisation: ``(texture * texstd + texmean) / 255``.

    Args:
        texture: (N, 3, T, T) float32, normalised ((t - texmean) / texstd), vertically flipped.
        tex_mean: (1, 3, T, T) or (3, T, T) float32, mean texture in 8-bit scale (0..255),
            flipped the same way, on ``texture``'s device.
        tex_std: Texture standard deviation in 8-bit scale (sqrt of tex_var.txt).

    Returns:
        (N, 3, T, T) float32 texture in [0, 1] scale (values may leave [0, 1]).
    """
    return (texture * tex_std + tex_mean) / 255.0


def vert_loss(pred_verts: torch.Tensor, gt_verts: torch.Tensor) -> torch.Tensor:
    """Mean squared vertex error, in normalised vertex units.

    Args:
        pred_verts: (N, V, 3) float32 predicted ``aligned_verts`` (normalised).
        gt_verts: (N, V, 3) float32 ground-truth ``aligned_verts`` (normalised).

    Returns:
        0-d float32 tensor.
    """
    return torch.mean((pred_verts - gt_verts) ** 2)


def tex_loss(
    pred_tex: torch.Tensor,
    gt_tex: torch.Tensor,
    mask: torch.Tensor,
    tex_mean: torch.Tensor,
    tex_std: float,
) -> torch.Tensor:
    """Masked texture MSE: ``MSE(pred01 * mask, gt01 * mask) * 255^2 / texstd^2``.

    Both textures are taken back to [0, 1] scale with :func:`texture_to_unit` first, so the
    result is an 8-bit-scale MSE divided by texstd^2 (normalised texture units). Texels
    outside the mask count as zero error but still count in the mean, as in the seed.

    Args:
        pred_tex: (N, 3, T, T) float32 predicted texture, normalised.
        gt_tex: (N, 3, T, T) float32 per-view texture ``tex``, normalised.
        mask: (N, 1 or 3, T, T) float32 ``mask`` (1 where the camera saw the texel).
        tex_mean: (1, 3, T, T) float32 mean texture, 8-bit scale, flipped.
        tex_std: Texture standard deviation, 8-bit scale.

    Returns:
        0-d float32 tensor.
    """
    pred01 = texture_to_unit(pred_tex, tex_mean, tex_std)
    gt01 = texture_to_unit(gt_tex, tex_mean, tex_std)
    return torch.mean((pred01 * mask - gt01 * mask) ** 2) * EIGHT_BIT_SQUARED / tex_std**2


def screen_loss(
    rendered: torch.Tensor, photo: torch.Tensor, screen_mask: torch.Tensor, tex_std: float
) -> torch.Tensor:
    """Weighted photo error: ``mean((rendered - photo)^2 * screen_mask) * 255^2 / texstd^2``.

    The result is an 8-bit-scale squared error divided by texstd^2 (normalised texture units).

    Args:
        rendered: (N, H, W, 3) float32 render of the predicted texture in [0, 1] scale
            (:meth:`trainer.render.Renderer.shade`), zero where the mesh does not cover.
        photo: (N, H, W, 3) float32 ``photo`` in [0, 1].
        screen_mask: (N, H, W, 1 or 3) float32 render of the UV-space loss weight image.
        tex_std: Texture standard deviation, 8-bit scale.

    Returns:
        0-d float32 tensor.
    """
    return torch.mean((rendered - photo) ** 2 * screen_mask) * EIGHT_BIT_SQUARED / tex_std**2


def kl_divergence(mean: torch.Tensor, logstd: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logstd)^2) || N(0, 1)), averaged over batch and latent dimensions.

    ``0.5 * mean(exp(2 logstd) + mean^2 - 1 - 2 logstd)``; unitless, per latent dimension.

    Args:
        mean: (N, L) float32 posterior mean (already scaled by 0.1 in the models).
        logstd: (N, L) float32 posterior log standard deviation (already scaled by 0.01).

    Returns:
        0-d float32 tensor.
    """
    return 0.5 * torch.mean(torch.exp(2.0 * logstd) + mean**2 - 1.0 - 2.0 * logstd)


def total_loss(
    vert: torch.Tensor,
    tex: torch.Tensor,
    screen: torch.Tensor | None,
    kl: torch.Tensor,
    lambda_verts: float = 1.0,
    lambda_tex: float = 1.0,
    lambda_screen: float = 0.0,
    lambda_kl: float = 0.01,
) -> torch.Tensor:
    """Weighted sum ``l_verts*vert + l_tex*tex + l_screen*screen + l_kl*kl``.

    A term whose weight is 0 is left out rather than multiplied by 0, as in the seed, so an
    uncomputed screen loss (``None``) or a non-finite term with weight 0 cannot poison the sum.

    Args:
        vert: 0-d :func:`vert_loss`.
        tex: 0-d :func:`tex_loss`.
        screen: 0-d :func:`screen_loss`, or None when ``lambda_screen`` is 0.
        kl: 0-d :func:`kl_divergence`.
        lambda_verts: Weight of the vertex loss (>= 0).
        lambda_tex: Weight of the texture loss (>= 0).
        lambda_screen: Weight of the screen loss (>= 0).
        lambda_kl: Weight of the KL term (>= 0).

    Returns:
        0-d float32 tensor on the terms' device.

    Raises:
        ValueError: If a weight is negative, or ``lambda_screen`` > 0 with ``screen`` None.
    """
    terms = (
        ("lambda_verts", lambda_verts, vert),
        ("lambda_tex", lambda_tex, tex),
        ("lambda_screen", lambda_screen, screen),
        ("lambda_kl", lambda_kl, kl),
    )
    total = torch.zeros((), dtype=vert.dtype, device=vert.device)
    for name, weight, term in terms:
        if weight < 0:
            raise ValueError(f"{name} must be >= 0, got {weight}")
        if weight == 0:
            continue
        if term is None:
            raise ValueError(f"{name}={weight} but its loss was not computed (got None)")
        total = total + weight * term
    return total
