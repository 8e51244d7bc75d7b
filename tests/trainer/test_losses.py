"""Tests for trainer.losses against hand computations in numpy (reference section 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import kl_divergence, screen_loss, tex_loss, texture_to_unit, total_loss, vert_loss

RNG = np.random.default_rng(7)
TEX_STD = 37.5


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def test_vert_loss_is_plain_mse() -> None:
    """Pins vert_loss = mean squared error over all coordinates, normalised units."""
    pred, gt = RNG.normal(size=(2, 5, 3)), RNG.normal(size=(2, 5, 3))
    assert float(vert_loss(_t(pred), _t(gt))) == pytest.approx(np.mean((pred - gt) ** 2), rel=1e-5)


def test_texture_to_unit() -> None:
    """Pins X01 = (X * texstd + texmean) / 255."""
    tex, mean = RNG.normal(size=(1, 3, 2, 2)), RNG.uniform(0, 255, size=(1, 3, 2, 2))
    np.testing.assert_allclose(
        texture_to_unit(_t(tex), _t(mean), TEX_STD).numpy(), (tex * TEX_STD + mean) / 255, rtol=1e-5
    )


def test_tex_loss_matches_reference_formula_and_units() -> None:
    """Pins tex_loss = MSE(pred01*mask, gt01*mask) * 255^2 / texstd^2, which equals the masked MSE
    of the normalised textures (so it is NOT an 8-bit MSE; times texstd^2 it is)."""
    pred, gt = RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=(2, 3, 4, 4))
    mean = RNG.uniform(0, 255, size=(1, 3, 4, 4))
    mask = (RNG.uniform(size=(2, 3, 4, 4)) > 0.3).astype(np.float64)
    pred01, gt01 = (pred * TEX_STD + mean) / 255, (gt * TEX_STD + mean) / 255
    expected = np.mean((pred01 * mask - gt01 * mask) ** 2) * 255**2 / TEX_STD**2
    got = float(tex_loss(_t(pred), _t(gt), _t(mask), _t(mean), TEX_STD))
    assert got == pytest.approx(expected, rel=1e-4)
    assert got == pytest.approx(np.mean(((pred - gt) * mask) ** 2), rel=1e-4)


def test_screen_loss_matches_reference_formula() -> None:
    """Pins screen_loss = mean((render - photo)^2 * screen_mask) * 255^2 / texstd^2, mask broadcast
    over channels."""
    rendered, photo = RNG.uniform(size=(2, 6, 5, 3)), RNG.uniform(size=(2, 6, 5, 3))
    weight = RNG.uniform(size=(2, 6, 5, 1))
    expected = np.mean((rendered - photo) ** 2 * weight) * 255**2 / TEX_STD**2
    got = float(screen_loss(_t(rendered), _t(photo), _t(weight), TEX_STD))
    assert got == pytest.approx(expected, rel=1e-4)


def test_kl_formula() -> None:
    """Pins kl = 0.5 * mean(exp(2 logstd) + mean^2 - 1 - 2 logstd), zero for the prior."""
    mean, logstd = RNG.normal(size=(3, 8)), RNG.normal(scale=0.3, size=(3, 8))
    expected = 0.5 * np.mean(np.exp(2 * logstd) + mean**2 - 1 - 2 * logstd)
    assert float(kl_divergence(_t(mean), _t(logstd))) == pytest.approx(expected, rel=1e-5)
    assert float(kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4))) == 0.0


def test_total_loss_weights_and_default_lambdas() -> None:
    """Pins total = l_verts*vert + l_tex*tex + l_screen*screen + l_kl*kl with defaults 1, 1, 0, 0.01."""
    vert, tex, screen, kl = (torch.tensor(v) for v in (0.5, 2.0, 3.0, 4.0))
    assert float(total_loss(vert, tex, screen, kl)) == pytest.approx(0.5 + 2.0 + 0.01 * 4.0)
    weighted = total_loss(vert, tex, screen, kl, lambda_verts=2, lambda_tex=3, lambda_screen=5, lambda_kl=7)
    assert float(weighted) == pytest.approx(2 * 0.5 + 3 * 2.0 + 5 * 3.0 + 7 * 4.0)


def test_total_loss_leaves_out_zero_weighted_terms() -> None:
    """Pins that a zero weight drops its term: an uncomputed (None) or NaN screen loss with
    lambda_screen = 0 must not turn the total into NaN."""
    vert, tex, kl = torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0)
    assert float(total_loss(vert, tex, None, kl)) == 2.0
    assert not math.isnan(float(total_loss(vert, tex, torch.tensor(float("nan")), kl)))


def test_total_loss_rejects_bad_weights() -> None:
    """Pins clear errors for a negative weight and for a weighted but uncomputed screen loss."""
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="lambda_kl must be >= 0"):
        total_loss(one, one, one, one, lambda_kl=-1)
    with pytest.raises(ValueError, match="lambda_screen"):
        total_loss(one, one, None, one, lambda_screen=1)
