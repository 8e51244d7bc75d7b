"""Build a model from an architecture name, and load published or our own weights into it.

Published Multiface checkpoints are plain state dicts saved from DistributedDataParallel, so
every key starts with ``module.``; ours may not (or may carry ``_orig_mod.`` from
``torch.compile``). :func:`load_weights` accepts all of them. Example::

    state = read_state_dict("best_model.pth")
    model = build_model(**infer_model_config(state))
    load_weights(model, state)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainer.models.vae import DeepAppearanceVAE
from trainer.models.warp import WarpFieldVAE

ARCHS = ("base", "res", "warp", "non", "bilinear")
"""Architecture names accepted by :func:`build_model` (the seed's ``--arch`` values)."""

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DistributedDataParallel / DataParallel and by torch.compile."""

NESTED_STATE_KEYS = ("model", "state_dict")
"""Keys under which a checkpoint dict may hold the model's state dict."""


def build_model(arch: str, tex_size: int, mesh_inp_size: int, n_latent: int, n_cams: int) -> nn.Module:
    """Create a freshly initialised model of architecture ``arch``.

    Args:
        arch: One of :data:`ARCHS`.
        tex_size: Texture height and width (a multiple of 256; published models: 1024).
        mesh_inp_size: 3 * number of vertices (published: 21918).
        n_latent: Latent size (published: 256).
        n_cams: Number of cameras, camera 0 being the colour anchor (published: 38).

    Returns:
        A :class:`DeepAppearanceVAE` or, for ``warp``, a :class:`WarpFieldVAE`, on the CPU.

    Raises:
        ValueError: For an unknown ``arch`` or an unsupported ``tex_size``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if arch == "warp":
        return WarpFieldVAE(tex_size, mesh_inp_size, z_dim=n_latent, n_cams=n_cams)
    return DeepAppearanceVAE(
        tex_size,
        mesh_inp_size,
        n_latent=n_latent,
        n_cams=n_cams,
        res=arch == "res",
        non=arch == "non",
        bilinear=arch == "bilinear",
    )


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` without leading ``module.`` / ``_orig_mod.`` in its keys."""
    stripped = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in stripped:
            raise ValueError(f"state dict holds {name!r} twice (with and without a wrapper prefix)")
        stripped[name] = value
    return stripped


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth`` file onto the CPU, tensors only (``weights_only``).

    Accepts a plain state dict (published checkpoints) or a dict holding one under ``model``
    or ``state_dict``. Wrapper prefixes are stripped.

    Raises:
        ValueError: If the file holds no state dict.
    """
    loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping):
        for key in NESTED_STATE_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(
            f"{os.fspath(path)}: expected a state dict (name -> tensor), or a dict holding one "
            f"under {' or '.join(NESTED_STATE_KEYS)!r}; got {type(loaded).__name__}"
        )
    return strip_wrapper_prefixes(loaded)


def load_weights(
    model: nn.Module, source: str | os.PathLike[str] | Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Load a state dict into ``model``, with or without ``module.`` key prefixes.

    Args:
        model: The target model; a DistributedDataParallel wrapper is unwrapped.
        source: A state dict, or a path for :func:`read_state_dict`.
        strict: Require exactly the model's keys and shapes.

    Raises:
        ValueError: If keys or shapes differ (strict), naming the first differences and the
            likely cause (another architecture or configuration).
    """
    state = (
        read_state_dict(source) if isinstance(source, (str, os.PathLike)) else strip_wrapper_prefixes(source)
    )
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    target = model.module if isinstance(model, wrappers) else model
    target = getattr(target, "_orig_mod", target)
    expected = target.state_dict()
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if wrong_shape or (strict and (missing or unexpected)):
        raise ValueError(
            "checkpoint does not fit the model (another arch, tex_size, mesh size, latent size or "
            "camera count? infer_model_config() reads them from the checkpoint): "
            f"{len(wrong_shape)} shape mismatches {wrong_shape[:3]}, {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    target.load_state_dict(state, strict=strict)


def infer_model_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read :func:`build_model`'s arguments off a state dict's keys and shapes.

    Args:
        state_dict: A model state dict, with or without wrapper prefixes.

    Returns:
        ``{"arch", "tex_size", "mesh_inp_size", "n_latent", "n_cams"}``.

    Raises:
        ValueError: If the state dict is not a Multiface model's.
    """
    state = strip_wrapper_prefixes(state_dict)
    required = ("enc.texture_fc.weight", "enc.mesh_fc.weight", "enc.fc.weight", "cc.weight")
    absent = [k for k in required if k not in state]
    if absent:
        raise ValueError(f"not a Multiface model state dict: missing {absent}")
    first_conv = "dec.texture_decoder.upsample.0.conv1"
    if any(k.startswith("warp.") for k in state):
        arch = "warp"
    elif "enc.texture_encoder.downsample.0.res1.weight" in state:
        arch = "res"
    elif state[f"{first_conv}.deconv.weight"].shape[-1] == 3:
        arch = "bilinear"
    elif state[f"{first_conv}.bias"].shape[-1] == 1:
        arch = "non"
    else:
        arch = "base"
    texture_features = state["enc.texture_fc.weight"].shape[1]
    return {
        "arch": arch,
        "tex_size": 256 * math.isqrt(texture_features // 128),
        "mesh_inp_size": state["enc.mesh_fc.weight"].shape[1],
        "n_latent": state["enc.fc.weight"].shape[0] // 2,
        "n_cams": state["cc.weight"].shape[0] + 1,
    }
