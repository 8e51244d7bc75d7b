"""The ``multiface`` command line (``shards/cli.py``): lazy subcommands, help texts, no torch in the service.

Each check runs ``shards.cli.main`` in a fresh interpreter, so ``sys.modules`` shows exactly what
the command imported.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from shards.cli import command_help

PROBE = """
import json, sys
from shards.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(name for name in ("torch", "trainer", "webdataset") if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def run_cli(*argv: str) -> tuple[dict, str]:
    """Run ``multiface ARGV`` in a fresh interpreter: (exit code and heavy modules imported, stdout)."""
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return json.loads(result.stderr.strip().splitlines()[-1]), result.stdout


@pytest.fixture(scope="module")
def torch_is_installed() -> None:
    """The no-torch checks below can only fail where torch and the trainer's commands are installed."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed here, so no command could import it")


def test_serve_does_not_import_torch(torch_is_installed, tmp_path: Path):
    """Pins `multiface serve` importing torch (and the trainer) because every subcommand's module
    was imported to register it: 275 MiB idle RSS instead of 83 MiB. Checked for --help and for
    the serve path up to the settings check (the server's own modules are imported then)."""
    probe, stdout = run_cli("serve", "--help")
    assert probe == {"code": 0, "heavy": []} and "--data-root" in stdout
    missing = tmp_path / "missing"
    probe, _ = run_cli("serve", "--data-root", str(missing), "--shard-root", str(tmp_path))
    assert probe == {"code": 2, "heavy": []}
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, services.app, services.server; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.stdout.strip() == "False", imported.stderr


def test_help_lists_every_subcommand_with_its_help_without_importing_them(torch_is_installed):
    """Pins that lazy registration keeps `multiface --help` complete: every entry point of the
    multiface.commands group listed with the one-line help its register function gives, while
    no trainer module (nor torch) is imported."""
    probe, stdout = run_cli("--help")
    assert probe == {"code": 0, "heavy": []}
    commands = sorted(entry_points(group="multiface.commands"), key=lambda entry: entry.name)
    assert {"serve", "download", "train", "test", "ingest"} <= {entry.name for entry in commands}
    listed = " ".join(stdout.split())
    for entry in commands:
        text = command_help(entry)
        assert text, f"no help text found for {entry.name} ({entry.value})"
        assert f"{entry.name} {' '.join(text.split())}" in listed, entry.name


def test_the_chosen_command_is_registered_in_full():
    """Pins that the chosen subcommand still gets its own flags (and its own errors)."""
    _, stdout = run_cli("download", "--help")
    assert "--config" in stdout and "--base-url" in stdout
    probe, _ = run_cli("verify")
    assert probe["code"] == 2
    probe, _ = run_cli("no-such-command")
    assert probe["code"] == 2
