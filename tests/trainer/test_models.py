"""Tests for trainer.models: published-checkpoint compatibility, shapes, weight norm, init."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.models import (
    ARCHS,
    ColourCorrection,
    DeepAppearanceVAE,
    WarpFieldVAE,
    build_model,
    infer_model_config,
    load_weights,
    read_state_dict,
)
from trainer.models.layers import Conv2dWN, ConvTranspose2dWN, LinearWN, glorot_
from trainer.models.vae import UpsampleBlock
from trainer.models.warp import identity_grid

# A copy of ../shared/reference/checkpoint_keys.json travels with the tests (the GPU machine and
# plain clones have no ../shared); test_reference_copy_is_current keeps the two equal.
KEYS_JSON = Path(__file__).resolve().parent / "reference" / "checkpoint_keys.json"
SHARED_KEYS_JSON = Path(__file__).resolve().parents[3] / "shared" / "reference" / "checkpoint_keys.json"
SMALL = {"tex_size": 256, "mesh_inp_size": 3 * 40, "n_latent": 16, "n_cams": 4}


def _published_keys() -> dict:
    if not KEYS_JSON.is_file():
        pytest.fail(f"{KEYS_JSON} is missing: the published key list is part of the shared reference")
    return json.loads(KEYS_JSON.read_text())


def test_reference_copy_is_current() -> None:
    """Pins the vendored key list to the shared reference, so the copy cannot drift from it."""
    if not SHARED_KEYS_JSON.is_file():
        pytest.skip(f"{SHARED_KEYS_JSON} is not beside this checkout")
    assert json.loads(KEYS_JSON.read_text()) == json.loads(SHARED_KEYS_JSON.read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_matches_published_checkpoints(arch: str) -> None:
    """Pins every key and shape of the published checkpoints: a rename or resize breaks loading them."""
    published = _published_keys()
    config = published["config"]
    model = build_model(
        arch, config["tex_size"], config["mesh_inp_size"], config["nlatent"], config["n_cams"]
    )
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == dict(published["archs"][arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_output_shapes(arch: str) -> None:
    """Pins the forward contract (tuple order, shapes, 0-d kl) the trainer unpacks, at tex 256."""
    torch.manual_seed(0)
    model = build_model(arch, **SMALL)
    batch, size = 2, SMALL["tex_size"]
    avgtex = torch.randn(batch, 3, size, size)
    mesh = torch.randn(batch, 40, 3)
    view = F.normalize(torch.randn(batch, 3), dim=1)
    outputs = model(avgtex, mesh, view, cams=torch.tensor([0, 3]))
    texture_shape = (batch, 3, size, size)
    if arch == "warp":
        assert len(outputs) == 5
        warped, verts, unwarped, grid, kl = outputs
        assert warped.shape == unwarped.shape == texture_shape
        assert grid.shape == (batch, size, size, 2)
    else:
        assert len(outputs) == 3
        warped, verts, kl = outputs
        assert warped.shape == texture_shape
    assert verts.shape == (batch, 40, 3)
    assert kl.dim() == 0 and torch.isfinite(kl)


@pytest.mark.parametrize("tex_size", [512, 1024])
def test_encoder_flatten_and_decoder_start_follow_tex_size(tex_size: int) -> None:
    """Pins 128*(T/256)^2 encoder features and a (T/256)^2 decoder start (2048 and 4x4 at 1024)."""
    model = DeepAppearanceVAE(tex_size, 30, n_latent=8, n_cams=2)
    start = tex_size // 256
    assert model.enc.texture_fc.in_features == 128 * start**2
    assert model.dec.texture_fc.out_features == 8 * start**2


def test_unsupported_tex_size_is_a_clear_error() -> None:
    """Pins a ValueError naming the allowed sizes, instead of a reshape error deep in forward."""
    with pytest.raises(ValueError, match="multiple of 256"):
        DeepAppearanceVAE(300, 30)


def test_unknown_arch_is_a_clear_error() -> None:
    """Pins a ValueError listing the valid --arch values."""
    with pytest.raises(ValueError, match="base, res, warp, non, bilinear"):
        build_model("resnet", **SMALL)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_weights_with_and_without_module_prefix(prefix: str) -> None:
    """Pins loading DDP-saved (``module.``) and plain state dicts into an unwrapped model."""
    torch.manual_seed(0)
    source = build_model("res", **SMALL)
    target = build_model("res", **SMALL)
    state = {prefix + key: value for key, value in source.state_dict().items()}
    load_weights(target, state)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_read_state_dict_from_file_and_nested_dict(tmp_path: Path) -> None:
    """Pins reading a published file (prefixed keys) and our {"model": state} form from disk."""
    source = build_model("base", **SMALL)
    published = tmp_path / "published.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, published)
    nested = tmp_path / "ours.pth"
    torch.save({"model": source.state_dict(), "step": torch.tensor(3)}, nested)
    for path in (published, nested):
        state = read_state_dict(path)
        assert state.keys() == source.state_dict().keys()
        target = build_model("base", **SMALL)
        load_weights(target, path)
        torch.testing.assert_close(target.state_dict(), source.state_dict(), rtol=0, atol=0)


def test_load_weights_of_another_arch_names_the_mismatch() -> None:
    """Pins an error that names missing/unexpected keys when the arch is wrong, not a silent partial load."""
    state = build_model("warp", **SMALL).state_dict()
    with pytest.raises(ValueError, match="unexpected keys.*warp"):
        load_weights(build_model("base", **SMALL), state)


@pytest.mark.parametrize("arch", ARCHS)
def test_infer_model_config_round_trips(arch: str) -> None:
    """Pins reading arch and sizes off a (prefixed) state dict, so a published file needs no flags."""
    state = {f"module.{k}": v for k, v in build_model(arch, **SMALL).state_dict().items()}
    assert infer_model_config(state) == {"arch": arch, **SMALL}


def test_weight_norm_uses_whole_tensor_norm_and_output_gains() -> None:
    """Pins weight * g / ||W|| with ONE norm over the whole tensor and g on the output dim
    (dim 0 for Linear/Conv2d, dim 1 for ConvTranspose2d), against numpy."""
    rng = np.random.default_rng(0)
    linear = LinearWN(3, 2)
    conv = Conv2dWN(2, 3, 3, 1, 1)
    deconv = ConvTranspose2dWN(2, 3, 4, 2, 1)
    for layer, out_dim in ((linear, 0), (conv, 0), (deconv, 1)):
        weight = rng.normal(size=tuple(layer.weight.shape)).astype(np.float32)
        # Channels of very different norm: a per-channel norm would give another result.
        weight *= np.arange(1, weight.shape[out_dim] + 1, dtype=np.float32).reshape(
            [-1 if d == out_dim else 1 for d in range(weight.ndim)]
        )
        g = rng.uniform(0.5, 2.0, size=weight.shape[out_dim]).astype(np.float32)
        bias = rng.normal(size=layer.bias.shape).astype(np.float32)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            layer.g.copy_(torch.from_numpy(g))
            layer.bias.copy_(torch.from_numpy(bias))
        shape = [-1 if d == out_dim else 1 for d in range(weight.ndim)]
        effective = torch.from_numpy(
            weight * g.reshape(shape) / np.sqrt((weight.astype(np.float64) ** 2).sum())
        )
        if layer is linear:
            x = rng.normal(size=(4, 3)).astype(np.float32)
            expected = x @ effective.numpy().T + bias
            got = layer(torch.from_numpy(x)).detach().numpy()
        else:
            x = torch.from_numpy(rng.normal(size=(1, 2, 5, 5)).astype(np.float32))
            op = F.conv2d if layer is conv else F.conv_transpose2d
            expected = op(x, effective.float(), torch.from_numpy(bias), layer.stride, layer.padding).numpy()
            got = layer(x).detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_glorot_init_bounds_gain_and_tied_phases() -> None:
    """Pins the init: uniform within the LeakyReLU-gain Glorot bound, g = ||W|| (effective weight
    starts equal to the raw one), transposed kernels equal in all four stride phases."""
    torch.manual_seed(0)
    deconv = ConvTranspose2dWN(8, 4, 4, 2, 1)
    glorot_(deconv, 0.2)
    weight = deconv.weight.detach()
    bound = math.sqrt(2 / 1.04) * math.sqrt(2 / ((8 + 4) * 4)) * math.sqrt(3)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.5 * bound
    for rows, cols in ((0, 1), (1, 0), (1, 1)):
        torch.testing.assert_close(weight[:, :, rows::2, cols::2], weight[:, :, 0::2, 0::2])
    torch.testing.assert_close(deconv.g.detach(), torch.full((4,), float(torch.linalg.vector_norm(weight))))
    assert torch.count_nonzero(deconv.bias) == 0

    linear = LinearWN(30, 10)
    glorot_(linear, 1.0)
    assert linear.weight.abs().max() <= math.sqrt(2 / 40) * math.sqrt(3)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_upsample_block_activation_placement(residual: bool, last: bool) -> None:
    """Pins LeakyReLU after conv1 and after conv2 except in the last block (the texture output),
    and h = act(res(h) + h) for the residual variant."""
    torch.manual_seed(0)
    block = UpsampleBlock(4, 4, 3, in_size=2, last=last, residual=residual)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    x = torch.randn(2, 4, 2, 2)

    def act(t: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(t, 0.2)

    h = act(block.conv1(x))
    if residual:
        h = act(block.res1(h) + h)
    h = block.conv2(h)
    if not last:
        h = act(h)
    if residual:
        h = block.res2(h) + h
        if not last:
            h = act(h)
    torch.testing.assert_close(block(x), h)
    assert block(x).shape == (2, 3, 8, 8)


def test_colour_correction_anchors_camera_zero() -> None:
    """Pins camera 0 as the fixed anchor (gain 1, offset 0, not an optimiser parameter) and
    out = tex * w[cam] + b[cam] for the other cameras."""
    cc = ColourCorrection(3)
    with torch.no_grad():
        cc.weight.copy_(torch.tensor([2.0, 3.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1))
        cc.bias.fill_(0.5)
    texture = torch.randn(3, 3, 4, 4)
    out = cc(texture, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out[0], texture[0])
    torch.testing.assert_close(out[1], texture[1] * 2.0 + 0.5)
    torch.testing.assert_close(out[2], texture[2] * 3.0 + 0.5)
    assert {name for name, _ in cc.named_parameters()} == {"weight", "bias"}
    assert {"weight_anchor", "bias_anchor"} <= cc.state_dict().keys()


def test_sample_false_is_deterministic_and_uses_the_mean() -> None:
    """Pins ``sample=False`` giving z = mean (repeatable evaluation) while the default samples."""
    torch.manual_seed(0)
    model = build_model("base", **SMALL).eval()
    inputs = (torch.randn(1, 3, 256, 256), torch.randn(1, 40, 3), torch.tensor([[0.0, 0.0, 1.0]]))
    first = model(*inputs, sample=False)[0]
    second = model(*inputs, sample=False)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(model(*inputs)[0], model(*inputs)[0])


def test_warp_grid_is_identity_plus_field_over_tex_size() -> None:
    """Pins grid = normal_grid + field / T (x first) and that the texture is sampled there."""
    model = WarpFieldVAE(256, 30, z_dim=8, n_cams=2)
    final = model.warp.upsample[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.copy_(torch.tensor([128.0, 0.0]))  # +0.5 in x after / T
    z = torch.randn(1, 8)
    texture = torch.randn(1, 3, 256, 256)
    warped, grid = model.warp(z, texture)
    expected = identity_grid(256).permute(0, 2, 3, 1).clone()
    expected[..., 0] += 0.5
    torch.testing.assert_close(grid, expected)
    torch.testing.assert_close(warped, F.grid_sample(texture, expected, align_corners=False))
    assert model.warp.normal_grid[0, 0, 0, 0] == -1 and model.warp.normal_grid[0, 0, 0, -1] == 1
