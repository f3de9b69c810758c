"""Real tier: the official ``openai`` client against a real ``torchpool serve``.

One server, from a config file, serves three models with an API key:
``embedder`` (examples/text_embedding.py on a seeded BERT), ``gpt``
(examples/text_generation.py, a seeded GPT-2 with a chat template) and
``talker`` (tests/openai_models.py: a chat handler without a tokenizer, which
notes when its generator is closed). Answers are checked against the same
handlers run in-process; errors against the client's own exception types.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from openai.types.chat import ChatCompletionMessageParam
from schemathesis import checks

from examples.text_embedding import TextEmbedder
from examples.text_generation import TextGenerator
from gateway import create_app
from shared.config import ServeSettings
from tests.conftest import Server, wait_for
from tests.test_examples import SENTENCES, build_text_model
from tests.test_examples_serve import embed

os.environ["HF_HUB_OFFLINE"] = "1"

KEY = "sk-torchpool-test"
TOKENS = 20
CPU = torch.device("cpu")
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Once upon"},
]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("talker") / "closed.txt"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, text_dir: Path, marker: Path
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("openai")
    config = folder / "torchpool.toml"
    config.write_text(
        f"""
[server]
api_key = "{KEY}"

[models.embedder]
handler = "examples.text_embedding:TextEmbedder"
model_kwargs = {{ model_dir = {json.dumps(str(text_dir))} }}
workers = 1
max_batch_size = 16
max_batch_delay_ms = 20

[models.gpt]
handler = "examples.text_generation:TextGenerator"
model_kwargs = {{ max_new_tokens = {TOKENS} }}
workers = 1

[models.talker]
handler = "tests.openai_models:Talker"
model_kwargs = {{ marker = {json.dumps(str(marker))}, interval_s = 0.02 }}
workers = 1
heartbeat_s = 0.2
max_body_mb = 0.01
"""
    )
    server = Server(["--config", str(config)], folder / "serve.log", env={"HF_HUB_OFFLINE": "1"})
    try:
        server.wait_ready(3, timeout_s=240)  # three models importing transformers
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as made:
        yield made


@pytest.fixture(scope="module")
def embedder(text_dir: Path) -> TextEmbedder:
    handler = TextEmbedder(model_dir=str(text_dir))
    handler.load(CPU)
    return handler


@pytest.fixture(scope="module")
def generator() -> TextGenerator:
    handler = TextGenerator(max_new_tokens=TOKENS)
    handler.load(CPU)
    return handler


def generate(generator: TextGenerator, prompt: str, **parameters: Any) -> str:
    """What examples/text_generation.py writes for ``prompt``, run in-process."""
    with torch.inference_mode():
        return "".join(generator.predict_stream(generator.preprocess(prompt), parameters))


def chat_prompt(generator: TextGenerator, messages: list[ChatCompletionMessageParam]) -> str:
    text = generator.tokenizer.apply_chat_template(
        [{"role": m["role"], "content": str(m.get("content", ""))} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert isinstance(text, str)
    return text


def closed_count(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5


# --- models ----------------------------------------------------------------------------


def test_models_lists_and_retrieves_the_served_models(client: openai.OpenAI) -> None:
    assert sorted(model.id for model in client.models.list()) == ["embedder", "gpt", "talker"]
    assert client.models.retrieve("gpt").owned_by == "torchpool"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# --- embeddings --------------------------------------------------------------------------


def test_one_input_as_floats_matches_the_model_in_process(
    client: openai.OpenAI, embedder: TextEmbedder
) -> None:
    answer = client.embeddings.create(model="embedder", input=SENTENCES[0], encoding_format="float")
    assert answer.model == "embedder" and len(answer.data) == 1
    assert_close(answer.data[0].embedding, embed(embedder, [SENTENCES[0]], "text/plain")[0])
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


def test_several_inputs_in_base64_the_clients_default(
    client: openai.OpenAI, embedder: TextEmbedder
) -> None:
    answer = client.embeddings.create(model="embedder", input=SENTENCES)  # base64 on the wire
    want = embed(embedder, SENTENCES, "text/plain")
    assert [item.index for item in answer.data] == list(range(len(SENTENCES)))
    for item, row in zip(answer.data, want, strict=True):
        assert_close(item.embedding, row)
    raw = client.embeddings.with_raw_response.create(
        model="embedder", input=SENTENCES[:1], encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = base64.b64decode(encoded)
    assert_close(list(struct.unpack(f"<{len(decoded) // 4}f", decoded)), want[0])


def test_dimensions_shorten_to_unit_length_and_token_ids_are_taken(
    client: openai.OpenAI, embedder: TextEmbedder
) -> None:
    short = client.embeddings.create(
        model="embedder", input=SENTENCES[1], dimensions=8, encoding_format="float"
    )
    vector = torch.tensor(short.data[0].embedding)
    full = torch.tensor(embed(embedder, [SENTENCES[1]], "text/plain")[0])
    assert vector.shape == (8,)
    assert torch.allclose(vector, torch.nn.functional.normalize(full[:8], dim=0), atol=1e-5)
    ids = embedder.tokenizer(SENTENCES[:2])["input_ids"]
    by_ids = client.embeddings.create(model="embedder", input=ids, encoding_format="float")
    for item, row in zip(by_ids.data, embed(embedder, SENTENCES[:2], "text/plain"), strict=True):
        assert_close(item.embedding, row)


def test_concurrent_requests_are_batched_together(server: Server) -> None:
    async def burst() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, max_retries=0
        ) as client:
            calls = [client.embeddings.create(model="embedder", input=s) for s in SENTENCES * 4]
            return await asyncio.gather(*calls)

    before = _batches(server)
    answers = asyncio.run(burst())
    assert all(len(answer.data) == 1 for answer in answers)

    def grown() -> tuple[float, float] | None:
        # The counts come with heartbeats: wait for the burst's rows to show.
        passes, rows = (now - then for now, then in zip(_batches(server), before, strict=True))
        return (passes, rows) if rows >= 16 else None

    passes, rows = wait_for(grown, 10, "the burst's forward passes in /metrics")
    assert passes < rows, f"{rows} rows in {passes} forward passes: nothing was batched"


def _batches(server: Server) -> tuple[float, float]:
    """(forward passes, rows) of the embedder so far, from /metrics."""
    text = server.client.get("/metrics").text
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("count", "sum"):
            prefix = f"torchpool_batch_rows_{name}{{"
            if line.startswith(prefix) and 'model="embedder"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
    return found.get("count", 0.0), found.get("sum", 0.0)


# --- chat and completions --------------------------------------------------------------


def test_chat_streamed_deltas_join_into_the_whole_answer(
    client: openai.OpenAI, generator: TextGenerator
) -> None:
    whole = client.chat.completions.create(model="gpt", messages=HELLO, seed=7)
    text = whole.choices[0].message.content
    assert text == generate(generator, chat_prompt(generator, HELLO), seed=7)
    assert whole.choices[0].finish_reason == "stop" and whole.object == "chat.completion"
    assert whole.usage is not None and whole.usage.completion_tokens == TOKENS
    stream = client.chat.completions.create(
        model="gpt",
        messages=HELLO,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sampling_parameters_reach_the_handler(
    client: openai.OpenAI, generator: TextGenerator
) -> None:
    prompt = chat_prompt(generator, HELLO)
    answer = client.chat.completions.create(
        model="gpt", messages=HELLO, max_tokens=5, temperature=0.5, top_p=0.8, seed=3
    )
    asked = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.8, "seed": 3}
    assert answer.choices[0].message.content == generate(generator, prompt, **asked)
    assert answer.choices[0].finish_reason == "length"
    newer = client.chat.completions.create(
        model="gpt",
        messages=HELLO,
        max_completion_tokens=5,
        temperature=0.5,
        top_p=0.8,
        seed=3,
    )
    assert newer.choices[0].message.content == answer.choices[0].message.content


def test_completions_with_and_without_stream(
    client: openai.OpenAI, generator: TextGenerator
) -> None:
    whole = client.completions.create(model="gpt", prompt="Once upon a time", seed=1, max_tokens=9)
    assert whole.choices[0].text == generate(generator, "Once upon a time", seed=1, max_tokens=9)
    streamed = client.completions.create(
        model="gpt", prompt="Once upon a time", seed=1, max_tokens=9, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text


def test_stop_sequences_cut_the_text_across_deltas(client: openai.OpenAI) -> None:
    said: list[ChatCompletionMessageParam] = [{"role": "user", "content": "alpha beta gamma delta"}]
    whole = client.chat.completions.create(
        model="talker",
        messages=said,
        stop=["ta gam"],
        max_tokens=10,
    )
    assert whole.choices[0].message.content == "alpha be"
    assert whole.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="talker",
        messages=said,
        stop="ta gam",
        max_tokens=10,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "alpha be"


def test_sixteen_concurrent_async_streams(server: Server, generator: TextGenerator) -> None:
    prompt = chat_prompt(generator, HELLO)

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, max_retries=0
        ) as client:

            async def one(seed: int) -> str:
                stream = await client.chat.completions.create(
                    model="gpt",
                    messages=HELLO,
                    seed=seed,
                    max_tokens=8,
                    stream=True,
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            return await asyncio.gather(*(one(seed) for seed in range(16)))

    texts = asyncio.run(run_all())
    assert texts == [generate(generator, prompt, seed=seed, max_tokens=8) for seed in range(16)]


def test_a_client_closing_a_stream_halfway_closes_the_generator(
    client: openai.OpenAI, marker: Path
) -> None:
    before = closed_count(marker)
    said: list[ChatCompletionMessageParam] = [{"role": "user", "content": "talk forever"}]
    stream = client.chat.completions.create(model="talker", messages=said, stream=True)
    taken = [next(stream).choices[0].delta.content for _ in range(3)]
    assert taken == ["talk ", "forever ", "more "]
    stream.close()
    wait_for(lambda: closed_count(marker) == before + 1, 10, "the worker to close the generator")
    made = int(marker.read_text().splitlines()[-1].split()[-1])
    assert made < 200, f"the generator ran on to {made} outputs"
    # The one worker is free again.
    again = client.chat.completions.create(model="talker", messages=said, max_tokens=2)
    assert again.choices[0].message.content == "talk forever "


def test_a_stream_past_its_deadline_ends_in_an_error_the_client_raises(
    client: openai.OpenAI, marker: Path
) -> None:
    before = closed_count(marker)
    said: list[ChatCompletionMessageParam] = [{"role": "user", "content": "talk forever"}]
    stream = client.chat.completions.create(
        model="talker", messages=said, stream=True, extra_headers={"X-Request-Timeout": "1"}
    )
    received = []
    with pytest.raises(openai.APIError) as ended:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert ended.value.code == "deadline_exceeded"
    assert received[:2] == ["talk ", "forever "]
    wait_for(lambda: closed_count(marker) == before + 1, 10, "the worker to close the generator")


# --- errors -----------------------------------------------------------------------------


def test_errors_raise_the_clients_own_types(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", messages=HELLO)
    assert "embedder, gpt, talker" in unknown.value.message and unknown.value.param == "model"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(model="talker", messages=HELLO, temperature=0.5)
    assert unsupported.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as unknown_parameter:
        client.chat.completions.create(model="gpt", messages=HELLO, logit_bias={"1": 2})
    assert unknown_parameter.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as wrong_route:
        client.embeddings.create(model="gpt", input="hello")
    assert "/v1/chat/completions" in wrong_route.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt", messages=HELLO, n=2)
    stranger = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    long_talk: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 4000}]
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="talker", messages=long_talk)
    assert too_big.value.status_code == 413
    assert too_big.value.type == "invalid_request_error"


# --- fuzzing --------------------------------------------------------------------------

# The app's schema, its /v1 routes only, with each request's model one of those served so
# that generated requests reach the models (a model outside the list is still fuzzed).
# Not talker: its tiny body limit answers big generated bodies 413, which schemathesis
# does not count as refusing them.
OPENAPI = copy.deepcopy(create_app(ServeSettings()).openapi())
for _item in OPENAPI["paths"].values():
    for _operation in _item.values():
        _body = _operation.get("requestBody", {}).get("content", {}).get("application/json")
        if _body is not None:
            _body["schema"]["properties"]["model"] = {"enum": ["embedder", "gpt"]}
schema = schemathesis.openapi.from_dict(OPENAPI).include(path_regex="^/v1/")
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_schema_fuzzing_of_the_openai_routes(
    case: schemathesis.Case,  # type: ignore[type-arg]
    server: Server,
) -> None:
    response = case.call(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    case.validate_response(response, checks=CHECKS)
