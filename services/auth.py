"""Optional Bearer-token auth: a read token for trainers, an admin token for jobs.

With no token configured everything is open. Otherwise data and status reads need the read or
the admin token, and job endpoints need the admin token; health and readiness stay open.
Tokens are compared with :func:`hmac.compare_digest`, taken from the ``Authorization`` header
only (never a query string, which access logs would record), and never logged or echoed.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.errors import Unauthorized
from services.settings import Settings

# Declared so that OpenAPI documents the scheme; the checks below read the header themselves,
# because HTTPBearer folds "no header" and "malformed header" into one None.
bearer_scheme = HTTPBearer(auto_error=False, description="MULTIFACE_READ_TOKEN or MULTIFACE_ADMIN_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _matches(given: bytes, expected: Settings | None, names: tuple[str, ...]) -> bool:
    matched = False
    for name in names:
        token = getattr(expected, name)
        if token is not None:
            # No early exit: the time taken does not tell which token (if any) was close.
            matched |= hmac.compare_digest(given, token.get_secret_value().encode())
    return matched


def _check(request: Request, names: tuple[str, ...]) -> None:
    settings = _settings(request)
    if not settings.auth_enabled:
        return
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'", error="invalid_request")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized(
            "malformed Authorization header; expected 'Bearer <token>'", error="invalid_request"
        )
    # Starlette decodes header bytes as latin-1; encoding back gives the bytes the client sent.
    if not _matches(token.encode("latin-1"), settings, names):
        raise Unauthorized("the token is not valid for this endpoint")


def require_read(request: Request, _credentials: Credentials) -> None:
    """Dependency of data and status reads: the read or the admin token (when auth is on)."""
    _check(request, ("read_token", "admin_token"))


def require_admin(request: Request, _credentials: Credentials) -> None:
    """Dependency of job endpoints: the admin token (when auth is on)."""
    _check(request, ("admin_token",))


def require_status_page(request: Request, _credentials: Credentials) -> None:
    """Dependency of the HTML status page: open when ``public_status_page`` is set, else a read."""
    if not _settings(request).public_status_page:
        _check(request, ("read_token", "admin_token"))
