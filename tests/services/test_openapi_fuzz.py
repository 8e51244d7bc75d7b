"""Schemathesis over the live server's OpenAPI with every check. RELIABILITY.md row 7.

The quick run is bounded (10 examples per operation, a fixed seed); the ``slow`` run takes 200.
Path parameters of the file routes are pinned to published files so that fuzzing reaches the
range and conditional logic instead of stopping at 404.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import ADMIN_TOKEN, CRAFTED, READ_TOKEN, LiveServer, publish, settings_for

pytest.importorskip(
    "schemathesis", reason="schemathesis is a dev dependency: pip install 'schemathesis==4.32.5'"
)

CONFIG = """
[parameters]
entity = "{entity}"

[[operations]]
include-path-regex = "/meta/"
parameters = {{ entity = "{crafted}", name = "blob" }}

[[operations]]
include-path-regex = "/shards/"
parameters = {{ entity = "{crafted}", name = "small-000000.tar" }}
"""


def _run_schemathesis(own_roots, entity_name, blob, tmp_path, max_examples: int, timeout: float) -> None:
    data_root, shard_root = own_roots
    publish(shard_root, CRAFTED, {"meta/blob": blob, "shards/small-000000.tar": blob * 3})
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(entity=entity_name, crafted=CRAFTED))
    runner = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    settings = settings_for(
        data_root, shard_root, read_token=READ_TOKEN, admin_token=ADMIN_TOKEN, shard_size=300_000
    )
    with LiveServer(settings) as server:
        command = [
            runner, "--no-color", "--config-file", str(config), "run", f"{server.url}/openapi.json",
            "--checks", "all", "--max-examples", str(max_examples), "--seed", "1",
            "--request-timeout", "10", "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert "No issues found" in report, report[-3000:]
    print(report[report.rfind("Test cases:") :][:200])


def test_openapi_fuzzing_finds_no_5xx_and_no_schema_violation(own_roots, entity_name, blob, tmp_path):
    """Pins row 7: a 5xx, an undocumented status or content type, a response that violates its
    schema, a schema-violating request accepted, or auth ignored, on any operation."""
    _run_schemathesis(own_roots, entity_name, blob, tmp_path, max_examples=10, timeout=150)


@pytest.mark.slow
def test_openapi_fuzzing_long(own_roots, entity_name, blob, tmp_path):
    """Long variant of the fuzzing run (200 examples per operation)."""
    _run_schemathesis(own_roots, entity_name, blob, tmp_path, max_examples=200, timeout=900)
