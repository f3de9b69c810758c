"""Several models behind one gateway (issue #10): the config file, routing, per-model
health and metrics, a failing model beside serving ones, and run-time control.

Fast tests read config files and run the CLI's checks in-process; the real tier
is one gateway with three models (a demo, a TorchScript file, one whose
handler cannot be imported) that the tests of this module share in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from gateway.cli import EXIT_CONFIG, main
from gateway.pool.placement import Demand, plan_models
from shared import protocol
from shared.config import ConfigError
from shared.modelconfig import load
from tests.conftest import ROOT, Server, free_port, wait_for
from tests.load import ROW, Load
from tests.test_metrics import parse, value

ADMIN = "admin-secret"
AUTH = {"authorization": f"Bearer {ADMIN}"}


def write(folder: Path, text: str, name: str = "torchpool.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# --- fast: the config file ------------------------------------------------------------


@pytest.mark.fast
def test_a_config_file_gives_each_model_its_settings_and_server_defaults(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "clf.pt").write_bytes(b"PK\x03\x04")
    config = load(
        write(
            tmp_path,
            """
            [server]
            port = 9000
            admin_token = "t"
            default_model = "clf"
            timeout_s = 5            # every model's default

            [models.clf]
            model = "models/clf.pt"  # relative to this file
            workers = 3
            input_shape = [3, 8, 8]
            max_batch_delay_ms = 1

            [models.embed]
            handler = "pkg.mod:Embed"
            model_kwargs = { dim = 4 }
            timeout_s = 9
            """,
        ),
        overrides={"port": 9100},
    )
    assert config.server.port == 9100  # a flag wins over the file
    assert config.server.admin_token == "t" and config.server.default_model == "clf"
    clf, embed = config.models["clf"], config.models["embed"]
    assert list(config.models) == ["clf", "embed"]
    assert clf.model == str(tmp_path / "models" / "clf.pt")
    assert clf.workers == 3 and clf.input_shape == (3, 8, 8) and clf.max_batch_delay_ms == 1.0
    assert clf.timeout_s == 5.0 and embed.timeout_s == 9.0
    assert embed.model_kwargs == {"dim": 4} and embed.served_name == "embed"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.a]\nworkrs = 2\n", r"\[models\.a\] workrs: unknown key"),
        ("[models.a]\nworkers = 'two'\n", r"\[models\.a\] workers: 'two' is not a valid value"),
        ("[models.a]\nworkers = 1.5\n", r"\[models\.a\] workers: 1\.5 is not an integer"),
        ("[models.a]\nmax_batch_size = 0\n", r"\[models\.a\] max_batch_size: .*at least 1"),
        ("[models.a]\nmodel = 'nope.pt'\n", r"\[models\.a\] model: model file .* does not exist"),
        ("[models.a]\nport = 1\n", r"\[models\.a\] port: unknown key here \(port belongs in"),
        ("[server]\nmodel = 'x.pt'\n[models.a]\n", r"\[server\] model: unknown key in \[server\]"),
        ("[server]\nport = 70000\n[models.a]\n", r"\[server\] port: .*not a TCP port"),
        ("[server]\ndefault_model = 'b'\n[models.a]\n", r"\[server\] default_model: 'b'"),
        ("[modles.a]\n", r"unknown table \[modles\]"),
        ("[server]\n", r"no \[models\.NAME\] table"),
        ("[models.'a b']\n", r"\[models\.a b\]: a model name is"),
        ("[models.a\n", r"not valid TOML"),
    ],
)
@pytest.mark.fast
def test_config_mistakes_are_one_line_naming_file_table_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as raised:
        load(path)
    assert str(raised.value).startswith(str(path)) or "cannot read" in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.fast
def test_serve_refuses_a_bad_config_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[models.a]\nworkers = -1\n")
    assert main(["serve", "--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err == f"torchpool: error: {path}: [models.a] workers: --workers cannot be negative"
    # A model flag beside --config is refused: the file says what each model is.
    good = write(tmp_path, "[models.a]\n", "good.toml")
    assert main(["serve", "--config", str(good), "--workers", "3"]) == EXIT_CONFIG
    assert "--workers is a model setting" in capsys.readouterr().err


@pytest.mark.fast
def test_a_refused_model_file_names_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    path = write(tmp_path, "[models.a]\nmodel = 'junk.pt'\n")
    assert main(["serve", "--config", str(path)]) == EXIT_CONFIG
    assert f"{path}: [models.a] model: " in capsys.readouterr().err


@pytest.mark.fast
def test_placement_splits_the_cores_across_models_and_shares_only_when_out() -> None:
    demands = [Demand("a", 2, "cpu"), Demand("b", 1, "cpu", per_worker=2)]
    placed = plan_models(demands, cores=range(8), gpus=[])
    # The explicit count is kept; the other model's workers split what is left evenly.
    assert [p.cores for p in placed["a"]] == [(0, 1, 2), (3, 4, 5)]
    assert [p.cores for p in placed["b"]] == [(6, 7)]
    crowded = plan_models([Demand("a", 2, "cpu"), Demand("b", 2, "cpu")], cores=range(3), gpus=[])
    every = [core for placements in crowded.values() for p in placements for core in p.cores]
    assert len(every) == 4 and set(every) == {0, 1, 2}  # one core each, one shared
    gpu = plan_models(
        [Demand("a", 2, "cuda:1"), Demand("b", 1, "cpu")], cores=range(4), gpus=[0, 5]
    )
    assert [p.gpu for p in gpu["a"]] == [5, 5] and gpu["b"][0].gpu is None


# --- real tier --------------------------------------------------------------------------


def scripted(path: Path, seed: int) -> None:
    """A TorchScript model whose answers depend on ``seed``, written in a child process
    (this test process stays free of torch)."""
    program = (
        "import sys, torch; from tests.zoo import TinyMLP, seeded; "
        "m = seeded(TinyMLP(), int(sys.argv[2])); "
        "torch.jit.trace(m, torch.randn(2, 16)).save(sys.argv[1])"
    )
    subprocess.run(
        [sys.executable, "-c", program, str(path), str(seed)], cwd=ROOT, check=True, timeout=120
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    folder = tmp_path_factory.mktemp("multimodel")
    scripted(folder / "mlp.pt", seed=1)
    config = write(
        folder,
        f"""
        [server]
        admin_token = "{ADMIN}"
        heartbeat_s = 0.5

        [models.demo]
        workers = 1

        [models.mlp]
        model = "mlp.pt"
        workers = 1

        [models.broken]
        handler = "tests.zoo:NoSuchHandler"
        workers = 1
        """,
    )
    server = Server(["--config", str(config)], folder / "serve.log")
    try:
        server.wait_ready(2)
        yield server, folder
    finally:
        server.stop()


def model_entry(server: Server, name: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(m for m in server.health()["models"] if m["name"] == name)
    return entry


def test_each_model_answers_at_its_own_route(gateway: tuple[Server, Path]) -> None:
    server, _ = gateway
    demo = server.client.post("/predict/demo", json={"input_tensor": [ROW]})
    mlp = server.client.post("/predict/mlp", json={"input_tensor": [ROW]})
    assert demo.status_code == 200 and mlp.status_code == 200, (demo.text, mlp.text)
    assert demo.json() != mlp.json()  # two different models
    unknown = server.client.post("/predict/nope", json={"input_tensor": [ROW]})
    assert unknown.status_code == 404
    assert unknown.json()["models"] == ["demo", "mlp", "broken"]
    assert "nope" in unknown.json()["error"]
    # Several models and no default_model: plain /predict names none.
    plain = server.client.post("/predict", json={"input_tensor": [ROW]})
    assert plain.status_code == 404 and "/predict/{name}" in plain.json()["error"]
    v2 = server.client.post(
        "/v2/models/mlp/infer",
        json={"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ROW}]},
    )
    assert v2.status_code == 200, v2.text
    assert server.get("/v2/models/demo/ready").status_code == 200
    assert server.get("/v2/models/broken/ready").status_code == 503
    assert server.get("/v2/models/nope").status_code == 404
    # HTTP metrics tell the models apart; a name that is not served is no label.
    samples = parse(server.get("/metrics").text)
    requests = "torchpool_http_requests_total"
    named = {"route": "/predict/{name}", "code": "200"}
    assert value(samples, requests, **named, model="demo") == 1
    assert value(samples, requests, **named, model="mlp") == 1
    assert value(samples, requests, route="/predict/{name}", model="", code="404") == 1
    infer = {"route": "/v2/models/{name}/infer", "model": "mlp"}
    assert value(samples, requests, **infer, code="200") == 1
    assert value(samples, "torchpool_http_request_duration_seconds_count", **infer) == 1


def test_a_model_that_cannot_load_fails_alone(gateway: tuple[Server, Path]) -> None:
    server, _ = gateway
    wait_for(lambda: model_entry(server, "broken")["state"] == "failed", 60.0, "broken to fail")
    health = server.health()
    states = {m["name"]: m["state"] for m in health["models"]}
    assert states == {"demo": "ready", "mlp": "ready", "broken": "failed"}
    broken = model_entry(server, "broken")
    assert "NoSuchHandler" in broken["error"]
    assert len(broken["fingerprint"]) == 16
    assert {w["model"] for w in health["workers"]} == {"demo", "mlp", "broken"}
    assert health["shared_cores"] == [] or len(os.sched_getaffinity(0)) < 3
    # Ready means every model ready: a failed one keeps the gateway out of rotation.
    ready = server.get("/health/ready")
    assert ready.status_code == 503 and "broken" in ready.json()["reason"]
    index = server.client.post("/v2/repository/index").json()
    assert [(m["name"], m["state"]) for m in index] == [
        ("demo", "READY"), ("mlp", "READY"), ("broken", "UNAVAILABLE"),
    ]  # fmt: skip
    metrics = server.get("/metrics").text
    assert 'torchpool_workers_ready{model="mlp"} 1.0' in metrics
    assert 'torchpool_workers_ready{model="broken"} 0.0' in metrics


def test_a_reload_under_load_answers_every_request(gateway: tuple[Server, Path]) -> None:
    server, folder = gateway
    before = server.client.post("/predict/mlp", json={"input_tensor": [ROW]}).json()
    (old_pid,) = [w["pid"] for w in server.health()["workers"] if w["model"] == "mlp"]
    scripted(folder / "mlp-new.pt", seed=2)
    (folder / "mlp-new.pt").rename(folder / "mlp.pt")  # a new file renamed over the old
    with Load(server.url, threads=3, path="/predict/mlp") as load:
        wait_for(lambda: load.answered >= 20, 60.0, "load before the reload")
        reload = server.client.post("/admin/models/mlp/reload", headers=AUTH, timeout=120)
        assert reload.status_code == 200, reload.text
        answered = load.answered
        wait_for(lambda: load.answered >= answered + 20, 60.0, "load after the reload")
    assert load.errors == [] and set(load.statuses) == {200}, (load.statuses, load.errors)
    (new_pid,) = [w["pid"] for w in server.health()["workers"] if w["model"] == "mlp"]
    assert new_pid != old_pid
    after = server.client.post("/predict/mlp", json={"input_tensor": [ROW]}).json()
    assert after != before  # the new file's answers


def test_a_reload_that_fails_keeps_the_old_workers(gateway: tuple[Server, Path]) -> None:
    server, folder = gateway
    before = server.client.post("/predict/mlp", json={"input_tensor": [ROW]}).json()
    (folder / "mlp.pt").write_bytes(b"this is not a model")
    reload = server.client.post("/admin/models/mlp/reload", headers=AUTH, timeout=120)
    assert reload.status_code == 500 and reload.json()["code"] == "model_load_failed"
    assert "worker 0" in reload.json()["error"]
    again = server.client.post("/predict/mlp", json={"input_tensor": [ROW]})
    assert again.status_code == 200 and again.json() == before


def test_models_are_loaded_and_unloaded_at_run_time(gateway: tuple[Server, Path]) -> None:
    server, folder = gateway
    unload = server.client.delete("/admin/models/broken", headers=AUTH)
    assert unload.status_code == 200, unload.text
    assert server.get("/health/ready").status_code == 200  # every model left is ready
    gone = server.client.post("/predict/broken", json={"input_tensor": [ROW]})
    assert gone.status_code == 404
    taken = server.client.put("/admin/models/demo", headers=AUTH, json={"workers": 1})
    assert taken.status_code == 409
    bad = server.client.put("/admin/models/extra", headers=AUTH, json={"workrs": 1})
    assert bad.status_code == 400 and "workrs: unknown key" in bad.json()["error"]
    junk = server.client.put(  # mlp.pt holds junk since the failed reload
        "/admin/models/junk", headers=AUTH, json={"model": str(folder / "mlp.pt")}
    )
    assert junk.status_code == 400 and "mlp.pt" in junk.json()["error"]
    loaded = server.client.put(
        "/admin/models/extra", headers=AUTH, json={"workers": 2}, timeout=120
    )
    assert loaded.status_code == 201, loaded.text
    # 201 means every requested worker is ready, never a pool still loading.
    extra = loaded.json()["health"]
    assert [w["state"] for w in extra["workers"]] == ["ready", "ready"], extra
    answer = server.client.post("/predict/extra", json={"input_tensor": [ROW]})
    assert answer.status_code == 200
    assert server.client.delete("/admin/models/extra", headers=AUTH).status_code == 200
    wait_for(
        lambda: not any(w["model"] == "extra" for w in server.health()["workers"]),
        30.0,
        "the unloaded model's workers to go",
    )
    assert server.client.delete("/admin/models/extra", headers=AUTH).status_code == 404


def test_sighup_reloads_every_model_and_a_failure_spares_the_others(
    gateway: tuple[Server, Path],
) -> None:
    server, _ = gateway  # mlp's file is junk since the failed reload above

    def pids() -> dict[str, int]:
        return {w["model"]: w["pid"] for w in server.health()["workers"] if w["state"] == "ready"}

    before = pids()
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: pids().get("demo") not in (None, before["demo"]), 90.0, "demo reloaded")
    assert pids()["mlp"] == before["mlp"]  # its reload failed: the old worker serves on
    for name in ("demo", "mlp"):
        answer = server.client.post(f"/predict/{name}", json={"input_tensor": [ROW]})
        assert answer.status_code == 200, answer.text


def test_serve_exits_when_every_model_failed_or_any_with_strict(tmp_path: Path) -> None:
    broken = '[models.broken]\nhandler = "tests.zoo:NoSuchHandler"\nworkers = 1\n'
    alone = write(tmp_path, broken, "alone.toml")
    strict = write(tmp_path, f"[server]\nstrict = true\n[models.demo]\nworkers = 1\n{broken}")
    for config in (alone, strict):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "--config", str(config), "--port", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        assert "NoSuchHandler" in result.stderr.strip().splitlines()[-1]


def test_remote_workers_join_the_model_they_name_and_a_mismatch_is_refused(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = write(tmp_path, "[models.demo]\nworkers = 0\n[models.twin]\nworkers = 1\n")
    server = serve("--config", str(config), "--bind", endpoint, ready=1)
    common = [sys.executable, "-m", "worker", "--connect", endpoint, "--heartbeat-s", "0.5"]
    workers = [
        subprocess.Popen([*common, "--model-name", "demo"], cwd=ROOT),
        # The same model name with a flag that changes answers: another fingerprint.
        subprocess.Popen([*common, "--model-name", "demo", "--input-dtype", "float64"], cwd=ROOT),
    ]
    # An older build's HELLO carries no fingerprint: nothing to check, so refused too.
    context = zmq.Context()
    older = context.socket(zmq.DEALER)
    older.setsockopt(zmq.IDENTITY, protocol.control_identity("older-build"))
    older.setsockopt(zmq.LINGER, 0)
    older.connect(endpoint)
    hello = {"t": protocol.HELLO, "v": protocol.VERSION, "slot": -1, "pid": 1, "host": "old",
             "device": "cpu", "cores": [0], "threads": 1, "model": "demo"}  # fmt: skip
    older.send(protocol.pack(hello))
    # One that could not read its model file says so, and /health shows why.
    unreadable = context.socket(zmq.DEALER)
    unreadable.setsockopt(zmq.IDENTITY, protocol.control_identity("unreadable"))
    unreadable.setsockopt(zmq.LINGER, 0)
    unreadable.connect(endpoint)
    why = "cannot read its model file: [Errno 13] Permission denied: 'model.pt'"
    unreadable.send(protocol.pack({**hello, "fingerprint_error": why}))
    try:
        wait_for(
            lambda: (
                model_entry(server, "demo")["ready_workers"] == 1
                and len(model_entry(server, "demo")["refused_workers"]) == 3
            ),
            90.0,
            "one remote worker ready and three refused",
        )
        refused = {r["uid"]: r["reason"] for r in model_entry(server, "demo")["refused_workers"]}
        unsure = refused.pop("older-build")
        assert "sent no settings fingerprint" in unsure and "demo" in unsure
        assert why in refused.pop("unreadable")
        (mismatch,) = refused.values()
        assert "fingerprint" in mismatch and "is not model demo's" in mismatch
        joined = [w for w in server.health()["workers"] if w["model"] == "demo"]
        assert len(joined) == 1 and joined[0]["host"]
        answer = server.client.post("/predict/demo", json={"input_tensor": [ROW]})
        assert answer.status_code == 200, answer.text
    finally:
        older.close()
        unreadable.close()
        context.term()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)


def test_default_model_takes_plain_predict_and_streams_per_model(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    config = write(
        tmp_path,
        """
        [server]
        default_model = "counter"

        [models.demo]
        workers = 1

        [models.counter]
        handler = "tests.streams:Counter"
        workers = 1
        """,
    )
    server = serve("--config", str(config), ready=2)
    events = {"accept": "text/event-stream"}
    row = {"input_tensor": [[3, 0, -1]]}
    with server.client.stream("POST", "/predict", json=row, headers=events) as plain:
        assert plain.status_code == 200 and plain.headers["content-type"] == "text/event-stream"
        text = plain.read().decode()
    assert text.count("data: ") == 4 and "event: end" in text  # 3 outputs, then the end
    with server.client.stream("POST", "/predict/counter", json=row, headers=events) as named:
        assert named.status_code == 200 and named.read().decode() == text
    # The demo model does not stream: the same header gets its plain JSON answer.
    demo = server.client.post("/predict/demo", json={"input_tensor": [ROW]}, headers=events)
    assert demo.status_code == 200 and "prediction" in demo.json()
