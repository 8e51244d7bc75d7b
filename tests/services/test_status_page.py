"""The HTML status page, loaded by headless Chromium from the live server.

The screenshot is kept under the test's tmp path and copied to ``tests/output/`` (git-ignored)
for a person to look at. Skipped only when Chromium is absent (CI installs Debian's
``chromium`` package).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from service_harness import LiveServer, settings_for

from shards.completeness import scan_entity

OUTPUT = Path(__file__).resolve().parents[1] / "output"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *extra, url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def test_status_page_renders_entities_expressions_and_percentages(session_server, entity_cache, tmp_path):
    """Pins that the page a person opens shows each entity, one row per expression with the
    asset percentages of the completeness scan, and a manifest link; a template error or an
    empty table fails here."""
    with session_server.client() as client:
        response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    report = scan_entity(entity_cache)
    for expression in report.expressions:
        assert f"<td>{expression.expression}</td>" in response.text
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the HTML itself was checked")

    dom = _chromium(session_server.url + "/", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom.stdout))
    assert entity_cache.name in text and "Multiface Stream" in text
    rows = re.findall(r'<tr class="expression">(.*?)</tr>', dom.stdout, re.S)
    assert len(rows) == len(report.expressions)
    for row, expression in zip(rows, report.expressions, strict=True):
        cells = [
            html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
            for cell in re.findall(r"<td>(.*?)</td>", row, re.S)
        ]
        assert cells[0] == expression.expression
        assert cells[1] == str(expression.num_frames)
        photo = expression.totals()["photo"].percent
        assert cells[2] == f"{photo:.2f}%"
    assert 'class="manifest"' in dom.stdout

    screenshot = tmp_path / "status_page.png"
    shot = _chromium(
        session_server.url + "/", tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,900"
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(screenshot, OUTPUT / "status_page.png")


def test_status_page_shows_incomplete_entities_and_jobs(own_roots, entity):
    """Pins that missing files lower the percentages shown and that jobs are listed with their
    state (the page reads the same scan and job records as the API)."""
    data_root, shard_root = own_roots
    photos = sorted((entity / "images").rglob("*.png"))
    for path in photos[:3]:
        path.unlink()
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        job = client.post(f"/api/v1/entities/{entity.name}/verify").json()
        page = client.get("/").text
    assert job["id"] in page
    report = scan_entity(entity)
    assert report.totals()["photo"].percent < 100
    assert f"{report.totals()['photo'].percent:.2f}%" in page
    assert "3 missing files" in page
