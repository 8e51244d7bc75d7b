"""Shared fixtures: one synthetic-capture factory feeds every package's tests.

Entities are small, seeded and written as real files in the real Multiface layout; a session
cache keeps the suite fast, and tests that break files work on their own copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SMALL = {"expressions": 2, "frames": 3, "cameras": 3, "photo_size": (96, 64), "tex_size": 64, "seed": 7}


@pytest.fixture(scope="session")
def entity_cache(tmp_path_factory) -> Path:
    from shards.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("entity-cache"), **SMALL)


@pytest.fixture
def entity(entity_cache, tmp_path) -> Path:
    """A private copy of the small synthetic entity (tests may break its files)."""
    target = tmp_path / "raw" / entity_cache.name
    shutil.copytree(entity_cache, target)
    return target


def require_gpu() -> None:
    """Skip without CUDA, or fail when REQUIRE_GPU=1 (the GPU machine), so a GPU run cannot pass by skipping."""
    import torch

    if torch.cuda.is_available():
        return
    if os.environ.get("REQUIRE_GPU") == "1":
        pytest.fail("REQUIRE_GPU=1 but torch sees no CUDA device")
    pytest.skip("needs CUDA")
