"""Multiface deep appearance models (base, res, warp, non, bilinear) and checkpoint loading."""

from trainer.models.checkpoint import (
    ARCHS,
    build_model,
    infer_model_config,
    load_weights,
    read_state_dict,
    strip_wrapper_prefixes,
)
from trainer.models.colour import ColourCorrection
from trainer.models.vae import DeepAppearanceVAE
from trainer.models.warp import WarpFieldVAE

__all__ = [
    "ARCHS",
    "ColourCorrection",
    "DeepAppearanceVAE",
    "WarpFieldVAE",
    "build_model",
    "infer_model_config",
    "load_weights",
    "read_state_dict",
    "strip_wrapper_prefixes",
]
