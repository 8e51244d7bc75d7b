"""Fixtures of the data-service tests: a published copy of the synthetic entity and live servers.

Read-only tests share one session server over a session shard root; tests that change files
get their own roots (``own_roots``) and their own server.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import pytest

# The helper modules beside this file (service_harness, fault_proxy, ...) are imported by name;
# pytest's importlib mode does not put test folders on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

from service_harness import BIG_BYTES, CRAFTED, SHARD_SIZE, LiveServer, publish, settings_for  # noqa: E402

from shards.ingest import ingest  # noqa: E402


@pytest.fixture(scope="session")
def blob() -> bytes:
    return random.Random(1000).randbytes(1000)


@pytest.fixture(scope="session")
def published_root(entity_cache, tmp_path_factory, blob) -> Path:
    """Shard root with the synthetic entity ingested and the crafted entity (exact sizes). Never modify."""
    shard_root = tmp_path_factory.mktemp("published")
    ingest(entity_cache, shard_root, shard_size=SHARD_SIZE, workers=2)
    publish(
        shard_root,
        CRAFTED,
        {"meta/blob": blob, "shards/big-000000.tar": BIG_BYTES, "shards/small-000000.tar": blob * 3},
    )
    return shard_root


@pytest.fixture(scope="session")
def session_server(entity_cache, published_root):
    """A live server over the session roots, auth off. Read-only tests only."""
    with LiveServer(settings_for(entity_cache.parent, published_root)) as server:
        yield server


@pytest.fixture
def own_roots(entity, published_root, tmp_path) -> tuple[Path, Path]:
    """(data root, shard root): a private raw copy and a private copy of the synthetic entity's shards."""
    shard_root = tmp_path / "shards"
    shutil.copytree(published_root, shard_root, ignore=shutil.ignore_patterns(CRAFTED, ".service"))
    return entity.parent, shard_root


@pytest.fixture
def entity_name(entity_cache) -> str:
    return entity_cache.name
