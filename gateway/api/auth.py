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

from gateway.api.http import send_error
from shared.errors import Unauthorized

# Paths that need an API key when one is configured.
PROTECTED_PREFIXES = ("/predict", "/v2/models")


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


def parse_tokens(text: str | None) -> list[bytes]:
    return [part.strip().encode() for part in (text or "").split(",") if part.strip()]


def authorization(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bytes(value)
    return None


class ApiKeyMiddleware:
    """401 for inference routes without a valid ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, keys: list[bytes]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith(PROTECTED_PREFIXES)
            and not token_matches(authorization(scope), self.keys)
        ):
            error = Unauthorized("a valid API key is required: Authorization: Bearer KEY")
            await send_error(send, error)
            return
        await self.app(scope, receive, send)
