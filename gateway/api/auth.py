"""Bearer tokens: API keys for inference routes, an admin token for /admin.

Installed only when a key is configured, so an open server pays nothing per
request. Tokens are compared in constant time, against every configured key,
so the time taken says nothing about which key or how much of it matched.
Health probes (/health*, /v2/health/*) and the status page stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.http import request_headers, send_error
from shared.errors import Unauthorized

# Paths behind FastAPI that need an API key when one is configured. /predict is
# answered before the middleware runs (gateway.api.predict checks its own key).
PROTECTED_PREFIXES = ("/v2/models",)


def token_matches(header: bytes | None, tokens: Iterable[bytes]) -> bool:
    """True when ``header`` is ``Bearer <one of tokens>``; constant time per token."""
    presented = b""
    if header is not None:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            presented = value.strip()
    found = False
    for token in tokens:
        found |= hmac.compare_digest(presented, token)
    return found and bool(presented)


def require_api_key(header: bytes | None, keys: Iterable[bytes]) -> None:
    """Unauthorized (401) unless ``header`` presents one of the API ``keys``."""
    if not token_matches(header, keys):
        raise Unauthorized("a valid API key is required: Authorization: Bearer KEY")


def parse_tokens(text: str | None) -> list[bytes]:
    return [part.strip().encode() for part in (text or "").split(",") if part.strip()]


class ApiKeyMiddleware:
    """401 for inference routes without a valid ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, keys: list[bytes]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            try:
                require_api_key(request_headers(scope).authorization, self.keys)
            except Unauthorized as error:
                await send_error(send, error)
                return
        await self.app(scope, receive, send)
