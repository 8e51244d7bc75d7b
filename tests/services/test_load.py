"""Load and misbehaving clients against a live server: concurrency, slow headers, slow readers,
disconnects mid-shard and SIGTERM under load. RELIABILITY.md rows 8, 9, 10 and 21.

Figures (throughput, p99) are printed for the record, never asserted: timings belong in bench/.
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_harness import BIG_BYTES, CRAFTED, LiveServer, ServerProcess, free_port, settings_for, sha256_of

from shards.manifest import load_manifest
from shards.remote import fetch_file

BIG = f"/api/v1/entities/{CRAFTED}/shards/big-000000.tar"


def test_concurrent_clients_get_correct_bytes(session_server, published_root, entity_name):
    """Pins row 8: 16 clients fetching random shards at once must see zero errors and zero
    sha256 mismatches (no shared buffer, no fd mix-up between responses)."""
    manifest = load_manifest(published_root / entity_name)
    entries = list(manifest.files().values())
    base = f"{session_server.url}/api/v1/entities/{entity_name}/"
    errors, mismatches, latencies = [], [], []

    def client(number: int) -> int:
        rng = random.Random(number)
        received = 0
        for _ in range(12):
            entry = rng.choice(entries)
            sink = io.BytesIO()
            started = time.monotonic()
            try:
                fetch_file(base, entry.name, sink, entry, retries=0, stall_timeout=10)
            except Exception as error:  # counted and reported by the assertion below
                errors.append(repr(error))
                continue
            latencies.append(time.monotonic() - started)
            if sha256_of(sink.getvalue()) != entry.sha256:
                mismatches.append(entry.name)
            received += len(sink.getvalue())
        return received

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        total = sum(pool.map(client, range(16)))
    elapsed = time.monotonic() - started
    assert not errors and not mismatches
    assert len(latencies) == 16 * 12
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\n16 clients x 12 files: {total / elapsed / 1e6:.1f} MB/s, p99 {p99 * 1000:.0f} ms")


def _slow_header_connections(port: int, count: int) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        connections.append(connection)
    return connections


def test_slow_header_clients_do_not_starve_others_and_are_closed(own_roots):
    """Pins row 9 (headers): 50 connections trickling header bytes must not delay a normal
    request beyond a bound, and each must be closed by the server after the header timeout
    (uvicorn alone never closes them)."""
    data_root, shard_root = own_roots
    with LiveServer(settings_for(data_root, shard_root, header_timeout=1.5)) as server:
        slow = _slow_header_connections(server.port, 50)
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        stop = threading.Event()

        def trickle():
            while not stop.is_set():
                for connection in slow:
                    try:
                        connection.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        pass
                stop.wait(0.2)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            with server.client() as client:
                started = time.monotonic()
                assert client.get("/api/v1/health").status_code == 200
                assert client.get("/api/v1/entities").status_code == 200
                assert time.monotonic() - started < 1.0
            closed = 0
            deadline = time.monotonic() + 6
            for connection in slow + idle:
                connection.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    while connection.recv(1024):
                        pass
                    closed += 1
                except (ConnectionResetError, BrokenPipeError):
                    closed += 1
                except TimeoutError:
                    pass
            assert closed == 55
        finally:
            stop.set()
            trickler.join()
            for connection in slow + idle:
                connection.close()
        from services.server import header_timeouts

        assert header_timeouts() >= 55


def _disk_read(server) -> float:
    return server.runtime.metrics.disk_bytes_read._value.get()


def _open_streams(server) -> float:
    return server.runtime.metrics.open_streams._value.get()


def test_client_disconnect_stops_reading(session_server, published_root):
    """Pins row 10: a client that disconnects after 1 MiB of a 64 MiB shard must stop the
    server's disk reads within about one chunk plus socket buffers, and release the fd."""
    before = _disk_read(session_server)
    with socket.create_connection(("127.0.0.1", session_server.port)) as connection:
        connection.sendall(f"GET {BIG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < 1 << 20:
            received += len(connection.recv(65536))
    time.sleep(0.5)
    after_close = _disk_read(session_server) - before
    time.sleep(0.5)
    assert _disk_read(session_server) - before == after_close, "still reading after the disconnect"
    assert after_close < 16 << 20, f"read {after_close / 2**20:.1f} MiB of {BIG_BYTES >> 20} MiB"
    assert _open_streams(session_server) == 0
    big = str(published_root / CRAFTED / "shards" / "big-000000.tar")
    assert not any(
        os.readlink(f"/proc/self/fd/{fd}") == big for fd in os.listdir("/proc/self/fd") if _is_link(fd)
    )


def _is_link(fd: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{fd}")
        return True
    except OSError:
        return False


def test_slow_and_stuck_readers(own_roots, blob):
    """Pins row 9 (readers): a client reading slowly holds about one chunk of server memory and
    disk reads (not the file), others are served meanwhile, and a client that reads nothing is
    cut after the send timeout and its fd released."""
    data_root, shard_root = own_roots
    from service_harness import publish

    publish(shard_root, CRAFTED, {"shards/big-000000.tar": BIG_BYTES, "meta/blob": blob})
    with LiveServer(settings_for(data_root, shard_root, send_timeout=1.5)) as server:
        stuck = socket.create_connection(("127.0.0.1", server.port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(f"GET {BIG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.3)
        assert _disk_read(server) < 16 << 20
        with server.client() as client:
            started = time.monotonic()
            assert client.get(f"/api/v1/entities/{CRAFTED}/meta/blob").content == blob
            assert time.monotonic() - started < 1.0
        deadline = time.monotonic() + 5
        while _open_streams(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_streams(server) == 0
        assert server.runtime.metrics.errors.labels("client_send_timeout")._value.get() == 1
        assert _disk_read(server) < 16 << 20
        stuck.close()


def test_sigterm_under_load_then_clients_finish_on_restart(own_roots, entity_name, tmp_path, blob):
    """Pins row 21: SIGTERM during downloads must stop the server gracefully (lifespan shutdown
    run, exit within the grace period) and clients must retry against the restarted server and
    end with correct bytes."""
    data_root, shard_root = own_roots
    from service_harness import publish

    manifest = publish(shard_root, CRAFTED, {"shards/big-000000.tar": 16 << 20, "meta/blob": blob})
    big = manifest.shards[0]
    settings = settings_for(data_root, shard_root, graceful_shutdown_timeout=1.0)
    port = free_port()
    log = tmp_path / "server.log"
    server = ServerProcess(settings, port, log).start()
    base = f"{server.url}/api/v1/entities/{CRAFTED}/"
    outcomes, retries = [], []

    def client(number: int) -> None:
        for _ in range(6):
            sink = io.BytesIO()
            try:
                fetch_file(
                    base,
                    big.name,
                    sink,
                    big,
                    retries=12,
                    stall_timeout=5,
                    on_retry=lambda *a: retries.append(a),
                )
                outcomes.append(sha256_of(sink.getvalue()) == big.sha256)
            except Exception as error:  # reported by the assertion below
                outcomes.append(repr(error))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(6)]
    restarted = None
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is its clean exit.
        assert server.wait(10) in (0, -signal.SIGTERM)
        stopped_in = time.monotonic() - started
        assert "Application shutdown complete" in log.read_text()
        restarted = ServerProcess(settings, port, log).start()
        for thread in threads:
            thread.join(60)
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
    assert outcomes == [True] * 36
    assert retries, "SIGTERM interrupted no download: the test did not test anything"
    assert stopped_in < 1.0 + 5
    print(f"\nSIGTERM: stopped in {stopped_in:.1f} s, {len(retries)} client retries, 36/36 downloads correct")


@pytest.mark.slow
def test_many_rounds_of_concurrent_clients(session_server, published_root, entity_name):
    """Long variant of the concurrency test (row 8): 32 clients x 100 files."""
    manifest = load_manifest(published_root / entity_name)
    entries = list(manifest.files().values())
    base = f"{session_server.url}/api/v1/entities/{entity_name}/"

    def client(number: int) -> int:
        rng = random.Random(number)
        bad = 0
        for _ in range(100):
            entry = rng.choice(entries)
            sink = io.BytesIO()
            fetch_file(base, entry.name, sink, entry, retries=0)
            bad += sha256_of(sink.getvalue()) != entry.sha256
        return bad

    with ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(client, range(32))) == 0
    with httpx.Client(base_url=session_server.url) as check:
        assert "multiface_http_requests_total" in check.get("/metrics").text
