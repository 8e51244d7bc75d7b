"""Auth matrix over every route of the live app: no, malformed and wrong tokens; tokens never logged.

RELIABILITY.md row 6.
"""

from __future__ import annotations

import logging

import pytest
from service_harness import ADMIN_TOKEN, CRAFTED, READ_TOKEN, LiveServer, settings_for

OPEN = {"/api/v1/health", "/api/v1/ready"}
ADMIN = {
    "/api/v1/downloads",
    "/api/v1/entities/{entity}/ingest",
    "/api/v1/entities/{entity}/verify",
    "/api/v1/jobs/{job_id}/cancel",
}
PARAMS = {"{entity}": CRAFTED, "{name}": "blob", "{job_id}": "verify-20250101T000000-00000000"}
BAD_HEADERS = {
    "none": None,
    "basic": "Basic dXNlcjpwYXNz",
    "bearer without token": "Bearer",
    "colon after scheme": f"Bearer: {READ_TOKEN}",
    "token in scheme position": f"{READ_TOKEN} Bearer",
    "token without scheme": READ_TOKEN,
    "two tokens": f"Bearer {READ_TOKEN} {READ_TOKEN}",
    "wrong token": "Bearer wrong-token-0123456789abcdef",
    "prefix of the token": f"Bearer {READ_TOKEN[:-1]}",
    "token plus a byte": f"Bearer {READ_TOKEN}x",
    "non-ascii": "Bearer café-token-0123456789".encode(),
}


@pytest.fixture(scope="module")
def auth_server(entity_cache, published_root):
    settings = settings_for(
        entity_cache.parent, published_root, read_token=READ_TOKEN, admin_token=ADMIN_TOKEN
    )
    with LiveServer(settings) as server:
        yield server


def _endpoints(app) -> list[tuple[str, str, str]]:
    """(method, path template, concrete URL) of every operation in the OpenAPI schema."""
    endpoints = []
    for path, operations in app.openapi()["paths"].items():
        url = path
        for placeholder, value in PARAMS.items():
            url = url.replace(placeholder, value)
        endpoints.extend((method.upper(), path, url) for method in operations)
    return sorted(endpoints)


def test_every_endpoint_is_covered(auth_server):
    """Pins that the matrix below covers every route (a new route cannot escape it) and the
    expected mix of open, read and admin routes."""
    paths = {path for _, path, _ in _endpoints(auth_server.app)}
    assert OPEN <= paths and ADMIN <= paths
    assert len(paths) >= 15


def test_bad_tokens_get_401_everywhere(auth_server, caplog):
    """Pins row 6: any endpoint but health reachable without a valid token, a 401 without
    WWW-Authenticate, or a token echoed in a body or written to a log."""
    caplog.set_level(logging.DEBUG)
    with auth_server.client() as client:
        for method, path, url in _endpoints(auth_server.app):
            for label, header in BAD_HEADERS.items():
                headers = {} if header is None else {"Authorization": header}
                response = client.request(method, url, headers=headers)
                if path in OPEN:
                    assert response.status_code == 200, (method, path, label)
                    continue
                assert response.status_code == 401, (method, path, label, response.status_code)
                assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
                assert READ_TOKEN not in response.text and ADMIN_TOKEN not in response.text
            query = client.request(method, f"{url}?token={READ_TOKEN}&access_token={ADMIN_TOKEN}")
            assert query.status_code == (200 if path in OPEN else 401), (method, path, "query string token")
    _assert_no_token_in(caplog)


def test_read_and_admin_tokens(auth_server, caplog):
    """Pins the split: the read token opens data and status reads but no job command; the admin
    token opens everything; neither is ever logged."""
    caplog.set_level(logging.DEBUG)
    with auth_server.client() as client:
        for method, path, url in _endpoints(auth_server.app):
            read = client.request(method, url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
            admin = client.request(method, url, headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
            if path in ADMIN:
                assert read.status_code == 401, (method, path)
            else:
                assert read.status_code != 401, (method, path)
            assert admin.status_code != 401, (method, path)
            assert admin.status_code < 500 and read.status_code < 500, (method, path)
    assert any("GET /api/v1/entities" in record.getMessage() for record in caplog.records), (
        "access log not captured"
    )
    _assert_no_token_in(caplog)


def test_status_page_can_be_public(entity_cache, published_root):
    """Pins MULTIFACE_PUBLIC_STATUS_PAGE: the HTML page opens without a token, the API does not."""
    settings = settings_for(
        entity_cache.parent,
        published_root,
        read_token=READ_TOKEN,
        admin_token=ADMIN_TOKEN,
        public_status_page=True,
    )
    with LiveServer(settings) as server, server.client() as client:
        assert client.get("/").status_code == 200
        assert client.get("/api/v1/entities").status_code == 401


def test_short_tokens_are_refused_at_startup(tmp_path):
    """Pins that a guessable token (under 16 characters) stops the server from starting."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="shorter than 16"):
        settings_for(tmp_path, tmp_path, read_token="short")


def _assert_no_token_in(caplog) -> None:
    """Server-side records only: the test's own HTTP client logs the URLs it was given."""
    server_side = [record for record in caplog.records if not record.name.startswith(("httpx", "httpcore"))]
    assert server_side, "no server log captured"
    for record in server_side:
        text = record.getMessage() + " " + str(record.args)
        assert READ_TOKEN not in text and ADMIN_TOKEN not in text, text
