"""Fixtures for the trainer tests: GPU availability that cannot pass by skipping on the GPU machine.

GPU tests are marked ``gpu`` (deselected by default) and run with
``REQUIRE_GPU=1 python -m pytest tests/trainer -m gpu``. With ``REQUIRE_GPU=1`` a missing CUDA
device or a missing nvdiffrast fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def _unavailable(reason: str) -> None:
    """Skip, or fail when REQUIRE_GPU=1 says this machine must run the GPU tests."""
    if os.environ.get("REQUIRE_GPU") == "1":
        pytest.fail(f"REQUIRE_GPU=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device, or skip (fail under REQUIRE_GPU=1) when torch sees none."""
    if not torch.cuda.is_available():
        _unavailable("torch sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def renderer_factory(cuda_device: torch.device):
    """Build :class:`trainer.render.Renderer` objects; skip (fail under REQUIRE_GPU=1) without nvdiffrast."""
    if importlib.util.find_spec("nvdiffrast") is None:
        _unavailable("nvdiffrast is not installed")
    from trainer.render import Renderer

    def make(antialias: bool = False) -> Renderer:
        return Renderer(cuda_device, antialias=antialias)

    return make
