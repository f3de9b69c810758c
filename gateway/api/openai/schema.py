"""The OpenAPI description of the /v1 routes, which no FastAPI route serves.

Request schemas say no more than :mod:`shared.openai_api` enforces, so a
body the schema calls invalid is always refused (the fuzzing in the tests
checks both ways); optional fields take ``null`` as "left out", as the API does.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Final

from shared import openai_api

JSON: Final = "application/json"
_ERROR: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_TOKENS: Final[dict[str, Any]] = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "integer", "minimum": 0},
}
_STOP: Final[dict[str, Any]] = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "maxItems": openai_api.MAX_STOP_SEQUENCES,
            "items": {"type": "string", "minLength": 1},
        },
        {"type": "null"},
    ]
}
_SAMPLING: Final[dict[str, Any]] = {
    "model": {"type": "string", "minLength": 1, "description": "A served model's name"},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": "boolean"}},
    },
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": ["integer", "null"]},
    "stop": _STOP,
    "n": {"type": ["integer", "null"], "enum": [1, None]},
    "user": {"type": ["string", "null"]},
}
_MESSAGE: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": list(openai_api.ROLES)},
        "content": {"type": ["string", "array", "null"]},
        "name": {"type": ["string", "null"]},
    },
}
EMBEDDINGS_REQUEST: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _SAMPLING["model"],
        "input": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": openai_api.MAX_EMBEDDING_INPUTS,
                    "items": {"type": "string", "minLength": 1},
                },
                _TOKENS,
                {"type": "array", "minItems": 1, "items": _TOKENS},
            ]
        },
        "encoding_format": {"type": ["string", "null"], "enum": ["float", "base64", None]},
        "dimensions": {"type": ["integer", "null"], "minimum": 1},
        "user": {"type": ["string", "null"]},
    },
}
CHAT_REQUEST: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
    },
}
COMPLETIONS_REQUEST: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {**_SAMPLING, "prompt": {"type": ["string", "array"]}},
}
_OBJECT: Final[dict[str, Any]] = {"type": "object", "required": ["object"]}
_POST_ERRORS: Final = (400, 401, 404, 413, 500, 503, 504)


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": HTTPStatus(status).phrase,
            "content": {JSON: {"schema": _ERROR}},
        }
        for status in statuses
    }


def _post(summary: str, request: dict[str, Any], streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": _OBJECT}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "post": {
            "summary": summary,
            "tags": ["OpenAI API"],
            "operationId": "openai_" + summary.lower().replace(" ", "_"),
            "requestBody": {"required": True, "content": {JSON: {"schema": request}}},
            "responses": {
                "200": {"description": "OpenAI's response object", "content": content},
                **_errors(*_POST_ERRORS),
            },
        }
    }


def paths() -> dict[str, Any]:
    """The /v1 routes' OpenAPI path items."""
    listing = {"200": {"description": "The served models", "content": {JSON: {"schema": _OBJECT}}}}
    return {
        "/v1/models": {
            "get": {
                "summary": "List models",
                "tags": ["OpenAI API"],
                "operationId": "openai_list_models",
                "responses": {**listing, **_errors(401)},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "Retrieve model",
                "tags": ["OpenAI API"],
                "operationId": "openai_retrieve_model",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {**listing, **_errors(401, 404)},
            }
        },
        openai_api.PATHS[openai_api.EMBEDDINGS]: _post(
            "Create embeddings", EMBEDDINGS_REQUEST, streams=False
        ),
        openai_api.PATHS[openai_api.CHAT]: _post(
            "Create chat completion", CHAT_REQUEST, streams=True
        ),
        openai_api.PATHS[openai_api.COMPLETIONS]: _post(
            "Create completion", COMPLETIONS_REQUEST, streams=True
        ),
    }
