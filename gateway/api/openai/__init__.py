"""The OpenAI API front: ``/v1/models``, ``/v1/embeddings``, ``/v1/chat/completions``,
``/v1/completions``, on the same pools, dispatchers, deadlines and streams as ``/predict``.

:mod:`~gateway.api.openai.routes` answers the requests (plain ASGI, ahead of
FastAPI), :mod:`~gateway.api.openai.errors` writes errors in OpenAI's shape
and :mod:`~gateway.api.openai.schema` describes the routes in the app's
OpenAPI document. The bodies themselves are read by :mod:`shared.openai_api`.
"""

from gateway.api.openai.routes import PREFIX, OpenAIHandler
from gateway.api.openai.schema import paths

__all__ = ["PREFIX", "OpenAIHandler", "paths"]
