"""Serving published files over a live server: names, symlinks, ranges, conditionals, methods.

RELIABILITY.md rows 1-5 and 13 (server side). Requests that clients would normalise are sent
as raw bytes on a socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest
from service_harness import CRAFTED, LiveServer, free_port, get_raw, publish, settings_for, sha256_of

from services.files import NGINX_INTERNAL_LOCATION

BLOB = f"/api/v1/entities/{CRAFTED}/meta/blob"

TRAVERSALS = [
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/../../../../etc/passwd",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/..%2f..%2f..%2fetc%2fpasswd",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/shards/%2e%2e%2fmanifest.json",
    b"/api/v1/entities/..%2f..%2f..%2fetc/meta/passwd",
    b"/api/v1/entities/%2e%2e/shards/passwd",
    b"//etc/passwd",
    b"/api/v1/entities/" + CRAFTED.encode() + b"//etc/passwd",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta//etc/passwd",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/blob%00.txt",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/blob\x00",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/" + b"a" * 5000,
    b"/api/v1/entities/" + b"b" * 5000 + b"/manifest.json",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/\xff\xfe\xc0\xaf",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/%ff%fe%c0%af",
    b"/api/v1/entities/\xc0\xae\xc0\xae/meta/KRT",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/.",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/%2e",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/shards/..",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/shards/...",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/blob/..",
    b"/api/v1/entities/.service/meta/x",
    b"/api/v1/entities/" + CRAFTED.encode() + b"/meta/%5c..%5c..%5cetc%5cpasswd",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=lambda target: repr(target[-40:])[2:-1])
def test_traversal_and_odd_names_are_refused(session_server, target):
    """Pins row 1: a path-joining route served ../, %2e%2e/, //etc/passwd; NUL, 5000 chars or
    non-UTF-8 raised 500. Must be 404/400 and carry no byte from outside the shard root."""
    status, _, body = get_raw(session_server.port, target)
    assert status in (400, 404), (status, body[:200])
    assert b"root:" not in body


def test_symlinks_below_the_shard_root_are_not_followed(own_roots, tmp_path, entity_name):
    """Pins row 2: a manifest-listed name that is a symlink (to /etc/passwd, or a symlinked
    folder) was followed out of the root. Must be 404."""
    data_root, shard_root = own_roots
    publish(shard_root, CRAFTED, {"meta/blob": b"x" * 10, "shards/real-000000.tar": b"y" * 10})
    folder = shard_root / CRAFTED
    (folder / "meta" / "blob").unlink()
    (folder / "meta" / "blob").symlink_to("/etc/passwd")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "real-000000.tar").write_bytes(b"y" * 10)
    os.rename(folder / "shards", folder / "shards-moved")
    (folder / "shards").symlink_to(outside)
    linked_entity = shard_root / "m--20200101--0000--2000--GHS"
    linked_entity.symlink_to(folder)
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        assert client.get(f"/api/v1/entities/{CRAFTED}/meta/blob").status_code == 404
        assert client.get(f"/api/v1/entities/{CRAFTED}/shards/real-000000.tar").status_code == 404
        assert client.get(f"/api/v1/entities/{linked_entity.name}/manifest.json").status_code == 404
        names = [entity["name"] for entity in client.get("/api/v1/entities").json()["entities"]]
        assert linked_entity.name not in names and CRAFTED in names


def test_unpublished_files_are_404_until_listed(own_roots):
    """Pins row 3: a shard being written (temp name) or on disk but not in the manifest was
    served. Must be 404 until the manifest lists it, then 200 with its bytes."""
    data_root, shard_root = own_roots
    publish(shard_root, CRAFTED, {"meta/blob": b"x" * 10})
    folder = shard_root / CRAFTED
    (folder / "shards" / ".late-000000.tar.tmp-123").write_bytes(b"partial")
    (folder / "shards" / "late-000000.tar").write_bytes(b"whole but unlisted")
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        base = f"/api/v1/entities/{CRAFTED}/shards"
        assert client.get(f"{base}/.late-000000.tar.tmp-123").status_code == 404
        assert client.get(f"{base}/late-000000.tar").status_code == 404
        assert client.get(f"/api/v1/entities/{CRAFTED}/meta/../shards/late-000000.tar").status_code == 404
        publish(shard_root, CRAFTED, {"meta/blob": b"x" * 10, "shards/late-000000.tar": b"whole but listed"})
        response = client.get(f"{base}/late-000000.tar")
        assert response.status_code == 200 and response.content == b"whole but listed"


@pytest.mark.parametrize(
    "header, status, selected",
    [
        ("bytes=0-8", 206, slice(0, 9)),
        ("bytes=-10", 206, slice(990, 1000)),
        ("bytes=990-", 206, slice(990, 1000)),
        ("bytes=995-5000", 206, slice(995, 1000)),
        ("bytes=0-0", 206, slice(0, 1)),
        ("bytes=-5000", 206, slice(0, 1000)),
        ("bytes=100000-", 416, None),
        ("bytes=1000-", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=5-2", 416, None),
        ("bytes=a-b", 416, None),
        ("bytes=", 416, None),
        ("bytes=-", 416, None),
        ("items=0-5", 200, slice(0, 1000)),
        ("bytes=0-1,5-6", 200, slice(0, 1000)),
        ("bytes=" + ",".join(f"{i}-{i + 500}" for i in range(150)), 200, slice(0, 1000)),
        ("bytes=" + ",".join("0-999" for _ in range(120)), 200, slice(0, 1000)),
    ],
)
def test_ranges(session_server, blob, header, status, selected):
    """Pins row 4: wrong bytes for a range, a 5xx or 200 for unsatisfiable or malformed ranges,
    and multi-range answers larger than the file. Decisions are in services/ranges.py."""
    with session_server.client() as client:
        response = client.get(BLOB, headers={"Range": header})
    assert response.status_code == status
    if status == 416:
        assert response.headers["content-range"] == "bytes */1000"
        return
    assert response.content == blob[selected]
    assert int(response.headers["content-length"]) == len(blob[selected]) <= 1000
    if status == 206:
        assert response.headers["content-range"] == f"bytes {selected.start}-{selected.stop - 1}/1000"


def test_conditionals_head_and_methods(session_server, blob):
    """Pins row 5: If-Range current -> 206, stale -> 200 whole; If-None-Match -> 304 without a
    body; HEAD -> headers only; other methods -> 405; the ETag is the manifest sha256."""
    etag = f'"{sha256_of(blob)}"'
    with session_server.client() as client:
        response = client.get(BLOB)
        assert response.status_code == 200 and response.headers["etag"] == etag
        assert response.headers["accept-ranges"] == "bytes"
        current = client.get(BLOB, headers={"Range": "bytes=10-19", "If-Range": etag})
        assert current.status_code == 206 and current.content == blob[10:20]
        stale = client.get(BLOB, headers={"Range": "bytes=10-19", "If-Range": '"' + "0" * 64 + '"'})
        assert stale.status_code == 200 and stale.content == blob
        dated = client.get(
            BLOB, headers={"Range": "bytes=10-19", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}
        )
        assert dated.status_code == 200 and dated.content == blob
        for match in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            cached = client.get(BLOB, headers={"If-None-Match": match, "Range": "bytes=0-1"})
            assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag
        assert client.get(BLOB, headers={"If-None-Match": '"other"'}).status_code == 200
        head = client.head(BLOB)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "1000" and head.headers["etag"] == etag
        head_range = client.head(BLOB, headers={"Range": "bytes=0-8"})
        assert head_range.status_code == 206 and head_range.headers["content-length"] == "9"
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert client.request(method, BLOB).status_code == 405
        manifest = client.get(f"/api/v1/entities/{CRAFTED}/manifest.json")
        assert manifest.status_code == 200 and manifest.json()["entity"] == CRAFTED
        assert manifest.headers["etag"] == f'"{sha256_of(manifest.content)}"'
        again = client.get(
            f"/api/v1/entities/{CRAFTED}/manifest.json", headers={"If-None-Match": manifest.headers["etag"]}
        )
        assert again.status_code == 304


def test_size_mismatch_is_refused_not_served(own_roots):
    """Pins the truncated-on-disk case: a file whose size differs from the manifest was served
    (short, or padded). Must be refused with 409 and never a 5xx; the fd is not leaked."""
    data_root, shard_root = own_roots
    publish(shard_root, CRAFTED, {"shards/cut-000000.tar": b"z" * 5000})
    os.truncate(shard_root / CRAFTED / "shards" / "cut-000000.tar", 4000)
    with LiveServer(settings_for(data_root, shard_root)) as server, server.client() as client:
        response = client.get(f"/api/v1/entities/{CRAFTED}/shards/cut-000000.tar")
        assert response.status_code == 409 and "run a verify job" in response.json()["detail"]
        assert client.head(f"/api/v1/entities/{CRAFTED}/shards/cut-000000.tar").status_code == 409
        assert server.runtime.metrics.open_streams._value.get() == 0


def test_every_synthetic_shard_is_served_whole(session_server, published_root, entity_name):
    """Pins that every manifest file of a real ingest is served byte for byte with its sha256 ETag."""
    from shards.manifest import load_manifest

    manifest = load_manifest(published_root / entity_name)
    with session_server.client() as client:
        for entry in manifest.files().values():
            response = client.get(f"/api/v1/entities/{entity_name}/{entry.name}")
            assert response.status_code == 200, entry.name
            assert sha256_of(response.content) == entry.sha256
            assert response.headers["etag"] == f'"{entry.sha256}"'


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "pread"])
def test_bodies_go_out_with_sendfile_unless_turned_off(own_roots, monkeypatch, zero_copy):
    """Pins the zero-copy path (bench/results_serve.md): with ``zero_copy`` on, file bodies must
    leave through os.sendfile and never be read into the app; off, through os.pread. Either way
    whole files, ranges across piece boundaries and HEAD give the right bytes, and the keep-alive
    connection stays usable afterwards (h11's Content-Length bookkeeping stays exact)."""
    data_root, shard_root = own_roots
    content = os.urandom(3 * (256 << 10) + 12345)
    publish(shard_root, CRAFTED, {"shards/piece-000000.tar": content})
    calls = {"sendfile": 0, "pread": 0}
    for name in calls:
        original = getattr(os, name)

        def counting(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(os, name, counting)
    url = f"/api/v1/entities/{CRAFTED}/shards/piece-000000.tar"
    settings = settings_for(data_root, shard_root, chunk_bytes=256 << 10, zero_copy=zero_copy)
    with LiveServer(settings) as server, server.client() as client:
        assert sha256_of(client.get(url).content) == sha256_of(content)
        ranged = client.get(url, headers={"Range": "bytes=1000-600000"})
        assert ranged.status_code == 206 and ranged.content == content[1000:600001]
        head = client.head(url)
        assert head.content == b"" and head.headers["content-length"] == str(len(content))
        assert client.get(url, headers={"Range": "bytes=-10"}).content == content[-10:]
        assert _on_one_connection(server.port, [url, url, "/api/v1/health"])[:2] == [content, content]
        assert server.runtime.metrics.disk_bytes_read._value.get() == 3 * len(content) + 599_001 + 10
    if zero_copy:
        assert calls["sendfile"] >= 4 and calls["pread"] == 0
    else:
        assert calls["sendfile"] == 0 and calls["pread"] >= 4


def test_a_slow_reader_that_keeps_reading_is_not_cut(own_roots):
    """Pins the stall timeout of the zero-copy path: measured on progress, so a reader that keeps
    taking bytes slowly (80 KB/s, far below one 1 MiB chunk per send_timeout) keeps its
    download; the pread path cut any reader slower than chunk_bytes / send_timeout."""
    data_root, shard_root = own_roots
    publish(shard_root, CRAFTED, {"shards/slow-000000.tar": 8 << 20})
    with LiveServer(settings_for(data_root, shard_root, send_timeout=1.0)) as server:
        with socket.socket() as connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
            connection.settimeout(5)
            connection.connect(("127.0.0.1", server.port))
            connection.sendall(
                f"GET /api/v1/entities/{CRAFTED}/shards/slow-000000.tar HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            received, until = 0, time.monotonic() + 3.0
            while time.monotonic() < until:
                chunk = connection.recv(8 << 10)
                assert chunk, f"cut after {received} bytes"
                received += len(chunk)
                time.sleep(0.1)
        assert server.runtime.metrics.errors.labels("client_send_timeout")._value.get() == 0


def _on_one_connection(port: int, targets: list[str]) -> list[bytes]:
    """GET each target in turn on one keep-alive connection; fails if the server closes it."""
    bodies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        reader = connection.makefile("rb")
        for target in targets:
            connection.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert reader.readline().startswith(b"HTTP/1.1 200"), target
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            assert "close" not in headers.get("connection", "")
            bodies.append(reader.read(int(headers["content-length"])))
    return bodies


NGINX_CONFIG = """
{user}
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen 127.0.0.1:{port};
        {internal}
        location / {{
            proxy_pass http://127.0.0.1:{app_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@pytest.mark.skipif(
    shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"), reason="needs nginx"
)
def test_accel_redirect_behind_nginx_keeps_the_app_contract(own_roots, tmp_path):
    """Pins MULTIFACE_ACCEL_REDIRECT_PREFIX: the app checks and decides, nginx sends the bytes.
    Through nginx the answers must be the app's: whole file with the manifest sha256 as ETag, one
    range 206, If-Range current 206 / stale or a date 200 (never a splice), several ranges 200,
    If-None-Match 304, unpublished 404; the internal location is not reachable from outside,
    and the app itself sends no file byte (a direct GET gets only the redirect)."""
    data_root, shard_root = own_roots
    content = os.urandom(300_000)
    publish(shard_root, CRAFTED, {"shards/accel-000000.tar": content})
    url = f"/api/v1/entities/{CRAFTED}/shards/accel-000000.tar"
    etag = f'"{sha256_of(content)}"'
    settings = settings_for(data_root, shard_root, accel_redirect_prefix="/internal/")
    with LiveServer(settings) as app:
        port = free_port()
        config = tmp_path / "nginx.conf"
        internal = NGINX_INTERNAL_LOCATION.format(prefix="/internal/", shard_root=shard_root)
        # Started as root, nginx workers would run as nobody, who cannot read pytest's tmp folders.
        user = "user root;" if os.geteuid() == 0 else ""
        config.write_text(
            NGINX_CONFIG.format(user=user, folder=tmp_path, port=port, app_port=app.port, internal=internal)
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        log = tmp_path / "error.log"
        process = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(config), "-e", str(log)])
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        whole = client.get(url)
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                        time.sleep(0.05)
                assert whole.status_code == 200 and whole.content == content
                assert whole.headers.get_list("etag") == [etag]
                assert whole.headers["content-type"] == "application/x-tar"
                assert "last-modified" not in whole.headers
                ranged = client.get(url, headers={"Range": "bytes=1000-1999", "If-Range": etag})
                assert ranged.status_code == 206 and ranged.content == content[1000:2000]
                for if_range in ('"stale"', "Sun, 29 Nov 2099 00:00:00 GMT"):
                    whole = client.get(url, headers={"Range": "bytes=1000-1999", "If-Range": if_range})
                    assert whole.status_code == 200 and whole.content == content, if_range
                several = client.get(url, headers={"Range": "bytes=0-1,5-6"})
                assert several.status_code == 200 and several.content == content
                assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
                assert client.get(url, headers={"Range": "bytes=5-2"}).status_code == 416
                assert client.get(f"/api/v1/entities/{CRAFTED}/shards/none-000000.tar").status_code == 404
                assert client.get(f"/internal/{CRAFTED}/shards/accel-000000.tar").status_code == 404
                assert client.get("/api/v1/summary").status_code == 200
            with app.client() as direct:
                redirect = direct.get(url)
                assert redirect.content == b""
                assert redirect.headers["x-accel-redirect"] == f"/internal/{CRAFTED}/shards/accel-000000.tar"
        finally:
            process.terminate()
            process.wait(10)
