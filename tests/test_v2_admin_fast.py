"""The Open Inference Protocol's routes and the admin API, in-process over fakes.

/v2: the formats an inference request goes out in, the metadata the workers'
READY described, readiness per model, and v2's own error bodies and statuses.
/admin: off without a token, 401 with a challenge without the right one, and
what resizing, loading and unloading answer. Real workers answer the same
routes in test_v2.py, test_admin_auth.py and test_multimodel.py.
"""

from __future__ import annotations

import asyncio
import gzip

import pytest

from gateway.pool.model import ModelState
from gateway.pool.workers import State
from shared import protocol
from tests.asgi import error_reply, reply, serving
from tests.fakes import eventually, on_loop

pytestmark = pytest.mark.fast

INFER = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
ADMIN = {"authorization": "Bearer s3cret"}


# --- /v2 ----------------------------------------------------------------------------


@on_loop
async def test_a_v2_json_request_goes_as_v2json_with_its_model_and_version() -> None:
    answer_body = b'{"model_name":"demo","outputs":[]}'
    async with serving() as served:
        served.ready()
        served.answer = lambda sent: [reply(sent, answer_body, fmt=protocol.FMT_V2_JSON)]
        answer = await served.client.post("/v2/models/demo/versions/1/infer", json=INFER)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.content == answer_body
        [sent] = served.requests()
        assert sent.header["fmt"] == protocol.FMT_V2_JSON
        assert (sent.header["model"], sent.header["version"]) == ("demo", "1")


@on_loop
async def test_a_v2_binary_request_and_answer_carry_their_json_length() -> None:
    head = b'{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32",'
    head += b'"parameters":{"binary_data_size":8}}]}'
    body = head + b"\x00" * 8
    out_json = b'{"outputs":[{"name":"output","parameters":{"binary_data_size":4}}]}'
    async with serving() as served:
        served.ready()
        served.answer = lambda sent: [
            reply(sent, out_json + b"\x01" * 4, fmt=protocol.FMT_V2_BINARY, json_len=len(out_json))
        ]
        # Compressed once: gzip stamps the current second into its header, so two
        # compressions of the same body differ when a second boundary falls between.
        compressed = gzip.compress(body)
        answer = await served.client.post(
            "/v2/models/demo/infer",
            content=compressed,
            headers={
                "inference-header-content-length": str(len(head)),
                "content-encoding": "gzip",
            },
        )
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/octet-stream"
        assert answer.headers["inference-header-content-length"] == str(len(out_json))
        assert answer.content == out_json + b"\x01" * 4
        [sent] = served.requests()
        assert sent.header["fmt"] == protocol.FMT_V2_BINARY
        assert (sent.header["json_len"], sent.header["encoding"]) == (len(head), "gzip")
        # Still compressed: the worker inflates it, not the gateway.
        assert sent.frames == [compressed]


@on_loop
async def test_v2_errors_are_an_error_body_with_the_protocols_status() -> None:
    async with serving() as served:
        served.ready()
        served.answer = lambda sent: [error_reply(sent, "shape_mismatch", "expected [-1, 16]")]
        shape = await served.client.post("/v2/models/demo/infer", json=INFER)
        assert shape.status_code == 400  # 422 on /predict; the protocol says 400
        assert shape.json() == {"error": "expected [-1, 16]"}

        unknown = await served.client.post("/v2/models/bert/infer", json=INFER)
        assert unknown.status_code == 404
        assert unknown.json() == {"error": "unknown model 'bert'; served: demo"}
        version = await served.client.get("/v2/models/demo/versions/7")
        assert version.status_code == 404
        assert version.json() == {"error": "model 'demo' has no version '7'; it has '1'"}

        encoding = await served.client.post(
            "/v2/models/demo/infer", json=INFER, headers={"content-encoding": "br"}
        )
        assert encoding.status_code == 400
        assert "Content-Encoding 'br' is not supported" in encoding.json()["error"]
        too_long = await served.client.post(
            "/v2/models/demo/infer",
            content=b"{}",
            headers={"inference-header-content-length": "9"},
        )
        assert too_long.status_code == 400
        assert "exceeds the body of 2 bytes" in too_long.json()["error"]
        assert len(served.requests()) == 1  # only the first reached the worker


@on_loop
async def test_v2_infer_waits_for_a_starting_worker_and_is_503_when_none_is_coming() -> None:
    async with serving() as served:
        waiting = asyncio.ensure_future(served.client.post("/v2/models/demo/infer", json=INFER))
        dispatcher = served.runtime.model().dispatcher
        await eventually(lambda: dispatcher.queued == 1, "the request to wait")
        dispatcher.give_up_waiting()  # nothing changed: the worker is still coming
        assert not waiting.done()
        served.runtime.model().pool.workers[0].state = State.FAILED
        dispatcher.give_up_waiting("worker 0 failed")
        answer = await waiting
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json() == {"error": "no worker is ready (1 failed): worker 0 failed"}


@on_loop
async def test_v2_metadata_and_readiness_come_from_the_workers_ready() -> None:
    async with serving() as served:
        client = served.client
        assert (await client.get("/v2")).json()["name"] == "torchpool"
        not_loaded = await client.get("/v2/models/demo")
        assert not_loaded.status_code == 503
        message = "model 'demo' is not loaded yet: no worker has loaded it"
        assert not_loaded.json() == {"error": message}
        not_ready = await client.get("/v2/models/demo/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["ready"] is False

        outputs = [{"name": "output", "dtype": "float32", "shape": [-1, 4]}]
        signature = {"source": "torchscript", "outputs": outputs, "stream": False}
        served.ready(signature=signature, input_shape=[16], input_dtype="float16")
        metadata = await client.get("/v2/models/demo/versions/1")
        assert metadata.status_code == 200
        assert metadata.json() == {
            "name": "demo",
            "versions": ["1"],
            "platform": "pytorch_libtorch",
            "inputs": [{"name": "input__0", "datatype": "FP16", "shape": [-1, 16]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}],
        }
        assert (await client.get("/v2/models/demo/ready")).json() == {"name": "demo", "ready": True}
        index = await client.post("/v2/repository/index")
        assert index.json() == [{"name": "demo", "version": "1", "state": "READY"}]


# --- /admin -------------------------------------------------------------------------


@on_loop
async def test_admin_routes_are_absent_without_a_token() -> None:
    async with serving() as served:
        answer = await served.client.get("/admin/workers", headers=ADMIN)
        assert answer.status_code == 404
        assert answer.json()["code"] == "http_error"


@on_loop
async def test_admin_routes_need_the_token_and_answer_401_with_a_challenge() -> None:
    async with serving(admin_token="s3cret") as served:
        calls = [
            ("GET", "/admin/workers"),
            ("PUT", "/admin/workers"),
            ("PUT", "/admin/models/other"),
            ("DELETE", "/admin/models/demo"),
            ("POST", "/admin/models/demo/reload"),
        ]
        for method, path in calls:
            for headers in ({}, {"authorization": "Bearer s3cre"}):
                answer = await served.client.request(method, path, headers=headers, json={})
                assert answer.status_code == 401, (method, path)
                assert answer.headers["www-authenticate"] == 'Bearer realm="torchpool"'
                assert answer.json()["code"] == "unauthorized"
        assert list(served.runtime.models) == ["demo"]
        assert len(served.spawner.processes) == 1


@on_loop
async def test_admin_resize_answers_the_target_and_refuses_a_bad_count() -> None:
    async with serving(admin_token="s3cret") as served:
        served.ready()
        pool = await served.client.get("/admin/workers", headers=ADMIN)
        assert pool.status_code == 200
        assert (pool.json()["model"], pool.json()["target_workers"]) == ("demo", 1)

        grown = await served.client.put("/admin/workers", json={"workers": 2}, headers=ADMIN)
        assert grown.status_code == 200
        assert grown.json()["target_workers"] == 2
        assert len(served.spawner.processes) == 2  # the new slot boots in the background
        assert grown.json()["health"]["total_workers"] == 2

        for body in ({"workers": -1}, {"workers": 1000}, {"workers": True}, {"count": 1}):
            bad = await served.client.put("/admin/workers", json=body, headers=ADMIN)
            assert bad.status_code == 400, body
            message = 'send {"workers": N} with 0 <= N <= 256'
            assert bad.json() == {"error": message, "code": "bad_request"}
        junk = await served.client.put("/admin/workers", content=b"{", headers=ADMIN)
        assert junk.status_code == 400
        assert junk.json()["error"].startswith("body is not valid JSON")
        unknown = await served.client.put(
            "/admin/models/bert/workers", json={"workers": 1}, headers=ADMIN
        )
        assert unknown.status_code == 404


@on_loop
async def test_admin_load_and_unload_a_model() -> None:
    async with serving(admin_token="s3cret") as served:
        served.ready()
        later = await served.client.put("/admin/models/other?wait=false", json={}, headers=ADMIN)
        assert later.status_code == 202
        assert later.json()["model"] == "other"
        assert served.runtime.models["other"].state is ModelState.LOADING
        taken = await served.client.put("/admin/models/other", json={}, headers=ADMIN)
        assert taken.status_code == 409
        assert taken.json()["error"] == "model 'other' is served already"

        # wait=true answers 201 once the new model's worker is ready.
        loading = asyncio.ensure_future(
            served.client.put("/admin/models/third", json={"workers": 1}, headers=ADMIN)
        )
        await eventually(lambda: "third" in served.runtime.models, "the third model to start")
        assert not loading.done()
        served.ready()
        loaded = await loading
        assert loaded.status_code == 201
        assert loaded.json()["health"]["ready_workers"] == 1
        assert (await served.client.post("/predict/third", json={})).status_code == 200

        bad = await served.client.put("/admin/models/x", json={"workers": "two"}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["code"] == "bad_request"
        assert "x" not in served.runtime.models

        gone = await served.client.delete("/admin/models/other", headers=ADMIN)
        assert gone.status_code == 200
        assert gone.json() == {"model": "other", "unloaded": True}
        after = await served.client.post("/predict/other", json={})
        assert after.status_code == 404 and after.json()["code"] == "model_not_found"
        again = await served.client.delete("/admin/models/other", headers=ADMIN)
        assert again.status_code == 404
