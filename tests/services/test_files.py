"""Serving published files over a live server: names, symlinks, ranges, conditionals, methods.

RELIABILITY.md rows 1-5 and 13 (server side). Requests that clients would normalise are sent
as raw bytes on a socket.
"""

from __future__ import annotations

import os

import pytest
from service_harness import CRAFTED, LiveServer, get_raw, publish, settings_for, sha256_of

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
