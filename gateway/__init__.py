"""torchpool's gateway: HTTP in, ZeroMQ out. It never imports torch."""

from gateway.app import create_app

__all__ = ["create_app"]
