"""X-Forwarded-* is honoured only when FORWARDED_ALLOW_IPS names the proxies to trust.

uvicorn's proxy-header middleware wraps every request, /predict included, and
torchpool itself reads neither the client address nor the scheme, so it is off
unless asked for. The scheme shows in the URL of a trailing-slash redirect.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Server, wait_for

FORWARDED = {"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7"}


def redirect_location(server: Server) -> str:
    wait_for(server.live, 60, "the HTTP server")
    response = server.client.get("/health/live/", headers=FORWARDED, follow_redirects=False)
    assert response.status_code == 307, response.text
    return response.headers["location"]


def test_forwarded_headers_are_ignored_by_default(
    serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    server = serve("--workers", "1", ready=0)
    assert redirect_location(server).startswith("http://127.0.0.1:")


def test_forwarded_headers_from_a_trusted_proxy_are_honoured(
    serve: Callable[..., Server],
) -> None:
    server = serve("--workers", "1", env={"FORWARDED_ALLOW_IPS": "127.0.0.1"}, ready=0)
    assert redirect_location(server).startswith("https://127.0.0.1:")
