"""Live servers, crafted shard folders and raw HTTP for the data-service tests (loopback only)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

import shards.ingest
from services.app import create_app
from services.server import build_config
from services.settings import Settings
from shards.manifest import FileEntry, Manifest, ShardEntry, save_manifest

CRAFTED = "m--20200101--0000--1000--GHS"
"""A shard folder written by the tests themselves: exact sizes, sparse big files."""

SHARD_SIZE = 250_000
"""About two samples of the small synthetic entity per shard, so it has several shards."""
BIG_BYTES = 64 << 20

READ_TOKEN = "read-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
HERE = Path(__file__).parent


class LiveServer:
    """The real app under real uvicorn in a thread of the test process, on a free loopback port."""

    def __init__(self, settings: Settings, **config_overrides):
        self.settings = settings
        self.app = create_app(settings)
        config_overrides.setdefault("log_config", None)
        self.server = uvicorn.Server(build_config(settings, app=self.app, **config_overrides))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-under-test", daemon=True)
        self.port = 0

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self):
        return self.app.state.runtime

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)


def settings_for(data_root: Path, shard_root: Path, **changes) -> Settings:
    values = {"data_root": data_root, "shard_root": shard_root, "port": 0, "scan_cache_seconds": 0} | changes
    return Settings(**values)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(shard_root: Path, entity: str, files: dict[str, bytes | int]) -> Manifest:
    """Write files (bytes, or an int for a sparse file of zeros of that size) and a manifest listing them."""
    folder = shard_root / entity
    metadata, shards = [], []
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            with open(path, "wb") as handle:
                handle.truncate(content)
            digest = hashlib.sha256()
            zeros = bytes(1 << 20)
            for start in range(0, content, len(zeros)):
                digest.update(zeros[: min(len(zeros), content - start)])
            size, sha = content, digest.hexdigest()
        else:
            path.write_bytes(content)
            size, sha = len(content), sha256_of(content)
        if name.startswith("shards/"):
            shards.append(ShardEntry(name, size, sha, num_samples=1, expressions=["E0"], cameras=["1"]))
        else:
            metadata.append(FileEntry(name, size, sha))
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        entity=entity,
        entity_id=entity.split("--")[3],
        state="complete",
        shard_size=1,
        num_planned_shards=len(shards),
        metadata=metadata,
        shards=shards,
    )
    save_manifest(folder, manifest)
    return manifest


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side normalisation) and read the reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def get_raw(port: int, target: bytes, headers: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    return raw_request(
        port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    )


class ServerProcess:
    """``services.server.run`` in a child process (for SIGTERM and kill -9), on a fixed port."""

    def __init__(self, settings: Settings, port: int, log: Path, sample_delay: float = 0.0):
        self.settings = settings.model_copy(update={"port": port})
        self.port = port
        self.log = log
        self.sample_delay = sample_delay
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        body = json.loads(self.settings.model_dump_json())
        for name in ("read_token", "admin_token"):
            secret = getattr(self.settings, name)
            body[name] = secret.get_secret_value() if secret else None
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "service_process.py"), json.dumps(body), str(self.sample_delay)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server process did not start; see {self.log}:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, number: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, number)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait(10)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_job(client, job_id: str, states=("succeeded", "failed", "cancelled", "interrupted")) -> dict:
    """Poll ``GET /api/v1/jobs/<id>`` until the job is in one of ``states``; its body."""
    return wait_for(lambda: (job := client.get(f"/api/v1/jobs/{job_id}").json())["state"] in states and job)


class Gate:
    """Makes ingest read a sample only when the test lets it (in-process server)."""

    def __init__(self, monkeypatch):
        self.permits = threading.Semaphore(0)
        self.open = threading.Event()
        self.waiting = threading.Event()
        """Set once an ingest waits at the gate (everything before its first sample is done)."""
        read = shards.ingest._EntityReader.read

        def gated_read(reader, *args, **kwargs):
            while not self.open.is_set() and not self.permits.acquire(timeout=0.05):
                self.waiting.set()
            return read(reader, *args, **kwargs)

        monkeypatch.setattr(shards.ingest._EntityReader, "read", gated_read)

    def allow(self, count: int) -> None:
        for _ in range(count):
            self.permits.release()
