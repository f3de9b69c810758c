"""Logic tier: the OpenAI API's bodies (shared.openai_api), a text answer's framing and stop
sequences (worker.codec.openai.TextContext), and errors in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from gateway.api.openai import errors
from shared import openai_api
from shared.config import ConfigError, parse_openai_routes
from shared.errors import ModelNotFound, PayloadTooLarge, RequestError, ShapeMismatch, Unavailable
from shared.openai_api import EmbeddingsRequest, TextRequest
from worker.codec.openai import TextContext, declared_routes

pytestmark = pytest.mark.fast


def body(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def test_embedding_inputs_in_every_shape() -> None:
    def inputs(value: Any) -> Any:
        request = openai_api.parse("embeddings", body(model="m", input=value))
        assert isinstance(request, EmbeddingsRequest)
        return request.inputs

    assert inputs("one") == ["one"]
    assert inputs(["a", "b"]) == ["a", "b"]
    assert inputs([1, 2, 3]) == [[1, 2, 3]]
    assert inputs([[1, 2], [3]]) == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": [""]}, "input"),
        ({"model": "m", "input": ["a", 1]}, "input"),
        ({"model": "m", "input": [[1], "a"]}, "input"),
        ({"model": "m", "input": [-1]}, "input"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "x", "dimensions": True}, "dimensions"),
        ({"model": "m", "input": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_embedding_requests_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as refused:
        openai_api.parse("embeddings", body(**fields))
    assert refused.value.status == 400
    assert refused.value.details.get("param") == param


def test_chat_parameters_under_one_name_each_and_nulls_left_out() -> None:
    request = openai_api.parse(
        "chat",
        body(
            model="m",
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            max_completion_tokens=5,
            temperature=0,
            top_p=None,
            stop="\n",
            seed=1,
            n=1,
            presence_penalty=0,
            stream=True,
            stream_options={"include_usage": True},
        ),
    )
    assert isinstance(request, TextRequest)
    assert request.messages == [{"role": "user", "content": "hi"}]
    assert request.parameters == {"max_tokens": 5, "temperature": 0.0, "seed": 1, "stop": ["\n"]}
    assert request.stream and request.include_usage


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
        ({"n": 2}, "n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"tools": []}, "tools"),
    ],
)
def test_bad_chat_requests_name_the_field(fields: dict[str, Any], param: str) -> None:
    document = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(RequestError) as refused:
        openai_api.parse("chat", orjson.dumps(document))
    assert refused.value.details.get("param") == param


def test_one_prompt_per_completion() -> None:
    request = openai_api.parse("completions", body(model="m", prompt=["Once"]))
    assert isinstance(request, TextRequest) and request.prompt == "Once"
    ids = openai_api.parse("completions", body(model="m", prompt=[5, 6]))
    assert isinstance(ids, TextRequest) and ids.prompt == [5, 6]
    with pytest.raises(RequestError, match="one prompt per request"):
        openai_api.parse("completions", body(model="m", prompt=["a", "b"]))


def test_the_openai_setting_names_known_routes() -> None:
    assert parse_openai_routes("chat, completions") == ("chat", "completions")
    with pytest.raises(ConfigError, match="unknown OpenAI route 'images'"):
        parse_openai_routes("images")


class _Declares:
    def __init__(self, routes: Any) -> None:
        self.openai_routes = routes


def test_declared_routes_must_fit_the_handler() -> None:
    from shared.errors import ModelLoadError

    assert declared_routes(_Declares(("chat",)), streams=True) == ["chat"]
    assert declared_routes(object(), streams=False) == []
    with pytest.raises(ModelLoadError, match="predict_stream"):
        declared_routes(_Declares(("chat",)), streams=False)
    with pytest.raises(ModelLoadError, match="embedder needs predict"):
        declared_routes(_Declares(["embeddings"]), streams=True)
    with pytest.raises(ModelLoadError, match="openai_routes must list"):
        declared_routes(_Declares(["images"]), streams=False)


# --- a text answer ------------------------------------------------------------------------


def context(stream: bool = True, **parameters: Any) -> TextContext:
    messages = [{"role": "user", "content": "hi"}]
    request = TextRequest("chat", "m", messages, None, stream, True, parameters)
    return TextContext(request, prompt_tokens=3)


def deltas(chunks: Sequence[bytes | None]) -> list[Any]:
    return [
        orjson.loads(chunk)["choices"][0]["delta"].get("content")
        for chunk in chunks
        if chunk is not None and orjson.loads(chunk)["choices"]
    ]


def test_a_stop_sequence_split_across_deltas_is_never_sent() -> None:
    text = context(stop=["END"])
    sent = [text.feed(piece) for piece in ["ab", "cE", "N", "Dxyz"]]
    assert deltas(sent) == ["ab", "c"]
    assert text.done and text._finish() == "stop"
    tail = text.tail()
    assert orjson.loads(tail[0])["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert orjson.loads(tail[1])["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }


def test_held_text_that_is_no_stop_after_all_is_sent_at_the_end() -> None:
    text = context(stop=["END"], max_tokens=2)
    assert deltas([text.feed("abE"), text.feed("N")]) == ["ab"]
    tail = text.tail()
    assert deltas(tail[:1]) == ["EN"]
    assert orjson.loads(tail[1])["choices"][0]["finish_reason"] == "length"


def test_the_first_chunk_says_the_role_and_a_whole_answer_is_one_message() -> None:
    text = context()
    first = orjson.loads(text.feed("a") or b"")
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    whole = context(stream=False)
    assert whole.feed({"text": "hello", "tokens": 2, "finish_reason": "length"}) is None
    document = orjson.loads(whole.whole())
    assert document["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert document["choices"][0]["finish_reason"] == "length"
    assert document["usage"]["completion_tokens"] == 2


def test_errors_in_openais_shape_with_its_statuses() -> None:
    unknown = ModelNotFound("no such model", param="model", models=["a"])
    assert errors.status_of(unknown) == 404
    assert errors.document(unknown) == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
            "models": ["a"],
        }
    }
    assert errors.status_of(ShapeMismatch("bad shape")) == 400
    assert errors.status_of(PayloadTooLarge("big")) == 413
    busy = Unavailable("queue full")
    assert errors.status_of(busy) == 503
    assert errors.document(busy)["error"]["type"] == "server_error"
