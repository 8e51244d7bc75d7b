"""Health, readiness, /metrics, settings from the environment and the ``multiface serve`` command."""

from __future__ import annotations

import argparse
import logging
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_harness import CRAFTED, LiveServer, publish, settings_for

import shards.ingest
from services.cli import register
from services.settings import Settings


def test_health_and_readiness(own_roots, tmp_path):
    """Pins the compose healthchecks: health is 200 always; readiness is 503 naming the root
    that is missing, 200 when both roots are usable."""
    data_root, shard_root = own_roots
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        assert client.get("/api/v1/health").json() == {"status": "ok"}
        assert client.get("/api/v1/ready").json()["ready"] is True
    with LiveServer(settings_for(data_root, tmp_path / "absent")) as server, server.client() as client:
        response = client.get("/api/v1/ready")
        assert response.status_code == 503 and "absent" in response.json()["checks"]["shard_root"]


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_metrics_count_routes_bytes_errors_and_ingest_progress(own_roots, entity, blob, monkeypatch):
    """Pins /metrics: requests labelled by route template (not the raw path), bytes served and
    read, errors, and the progress of a running ingest."""
    data_root, _ = own_roots
    shard_root = data_root.parent / "fresh-shards"
    publish(shard_root, CRAFTED, {"meta/blob": blob})
    release = threading.Event()
    read = shards.ingest._EntityReader.read

    def held_read(reader, *args, **kwargs):
        release.wait(20)
        return read(reader, *args, **kwargs)

    monkeypatch.setattr(shards.ingest._EntityReader, "read", held_read)
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        for _ in range(3):
            assert client.get(f"/api/v1/entities/{CRAFTED}/meta/blob").content == blob
        assert client.get(f"/api/v1/entities/{CRAFTED}/meta/nothing").status_code == 404
        assert client.get("/no/such/route").status_code == 404
        job = client.post(f"/api/v1/entities/{entity.name}/ingest").json()
        try:
            while client.get(job["url"]).json()["progress"]["samples_total"] == 0:
                time.sleep(0.02)
            text = client.get("/metrics").text
        finally:
            release.set()
        route = "/api/v1/entities/{entity}/meta/{name}"
        assert _sample(text, "multiface_http_requests_total", route=route, method="GET", status="200") == 3
        assert _sample(text, "multiface_http_requests_total", route=route, method="GET", status="404") == 1
        assert (
            _sample(text, "multiface_http_requests_total", route="unmatched", method="GET", status="404") == 1
        )
        assert "meta/blob" not in text and "/no/such/route" not in text
        assert _sample(text, "multiface_bytes_served_total", kind="meta") == 3 * len(blob)
        assert _sample(text, "multiface_disk_bytes_read_total") == 3 * len(blob)
        assert _sample(text, "multiface_open_file_streams") == 0
        assert _sample(text, "multiface_jobs_running", kind="ingest") == 1
        assert _sample(text, "multiface_ingest_samples_total", entity=entity.name, job=job["id"]) == 18
        assert _sample(text, "multiface_ingest_samples_done", entity=entity.name, job=job["id"]) == 0
        assert "multiface_header_timeouts_total" in text


def test_settings_come_from_the_environment(monkeypatch, tmp_path, caplog):
    """Pins the MULTIFACE_ prefix and the warning for a setting that silently does nothing."""
    monkeypatch.setenv("MULTIFACE_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("MULTIFACE_SHARD_ROOT", str(tmp_path / "shards"))
    monkeypatch.setenv("MULTIFACE_PORT", "9123")
    monkeypatch.setenv("MULTIFACE_READ_TOKEN", "r" * 20)
    settings = Settings()
    assert (settings.data_root, settings.port, settings.auth_enabled) == (tmp_path, 9123, True)
    with caplog.at_level(logging.WARNING):
        settings.warn_about_ineffective()
    assert "MULTIFACE_ADMIN_TOKEN" in caplog.text and "r" * 20 not in caplog.text
    assert "r" * 20 not in repr(settings) and "r" * 20 not in settings.model_dump_json()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiface")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_serve_command_help_and_bad_input(capsys, tmp_path, monkeypatch):
    """Pins ``multiface serve``: --help documents every flag; missing roots or a bad value exit 2
    with a message naming the flag, instead of a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--data-root", "--shard-root", "--host", "--port", "--workers", "--header-timeout"):
        assert flag in shown
    for name in ("MULTIFACE_DATA_ROOT", "MULTIFACE_SHARD_ROOT"):
        monkeypatch.delenv(name, raising=False)
    args = _parser().parse_args(["serve"])
    assert args.func(args) == 2
    assert "data_root" in capsys.readouterr().err
    args = _parser().parse_args(
        ["serve", "--data-root", str(tmp_path / "nope"), "--shard-root", str(tmp_path)]
    )
    assert args.func(args) == 2
    assert "is not a folder" in capsys.readouterr().err
    args = _parser().parse_args(
        ["serve", "--data-root", str(tmp_path), "--shard-root", str(tmp_path), "--port", "70000"]
    )
    assert args.func(args) == 2
    assert "port" in capsys.readouterr().err
