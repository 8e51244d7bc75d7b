"""Fixtures of the fault tests: helpers of the service tests on ``sys.path``, and figures.

The fault tests reuse ``tests/services`` helpers (``service_harness``, ``fault_proxy``,
``service_process``) and the torchrun helpers of ``tests/trainer/test_train_ddp.py`` by name,
as ``tests/services/conftest.py`` does for its own folder.

Every test reports what it measured as ``FIGURE name=value`` lines: printed by the test, listed
again in a "fault figures" section at the end of the run, and appended as JSON lines to the file
named by ``MULTIFACE_FIGURES`` when it is set (``RELIABILITY_REPORT.md`` is written from those).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
for folder in (HERE, HERE.parent / "services"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

FIGURES_ENV = "MULTIFACE_FIGURES"
_recorded: list[tuple[str, str, object]] = []


@pytest.fixture
def figure(request):
    """``figure(name, value)``: record one measured figure of this test."""

    def record(name: str, value: object) -> None:
        print(f"FIGURE {name}={value}", flush=True)
        _recorded.append((request.node.nodeid, name, value))
        path = os.environ.get(FIGURES_ENV)
        if path:
            with open(path, "a") as handle:
                handle.write(json.dumps({"test": request.node.nodeid, "name": name, "value": value}) + "\n")

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not _recorded:
        return
    terminalreporter.section("fault figures")
    for test, name, value in _recorded:
        terminalreporter.write_line(f"FIGURE {name}={value}  [{test}]")
