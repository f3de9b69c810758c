"""torchpool's gateway: HTTP in, ZeroMQ out. It never imports torch.

``create_app`` is imported on first use, not with the package, so the
commands that need no HTTP server (``torchpool keys``, ``torchpool worker``)
do not load FastAPI and uvicorn for nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from gateway.api.app import create_app

        return create_app
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
