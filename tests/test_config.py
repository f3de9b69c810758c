"""Settings: flags, environment fallback, validation, and the worker command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import (
    ConfigError,
    DeviceSpec,
    ModelSettings,
    ServeSettings,
    WorkerSettings,
    parse_cores,
    parse_device,
    parse_shape,
)
from shared.flags import env_name, flag, parse_settings, settings_fields, worker_argv

pytestmark = pytest.mark.fast

CONNECT = ["--connect", "ipc:///tmp/torchpool-test.sock"]


def test_defaults_without_flags_or_environment() -> None:
    settings = parse_settings(ServeSettings, [], environ={})
    assert settings == ServeSettings()
    assert settings.workers == 2
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.model_kwargs == {}
    assert settings.served_name == "demo"
    assert settings.max_body_bytes == 64 * 1024 * 1024


def test_flags_are_parsed_to_typed_values(tmp_path: Path) -> None:
    weights = tmp_path / "resnet.pt"
    weights.write_bytes(b"x")
    settings = parse_settings(
        ServeSettings,
        [
            "--model", str(weights),
            "--model-class", "mypkg.nets:ResNet",
            "--model-kwargs", '{"depth": 18}',
            "--workers", "4",
            "--device", "cpu",
            "--cores-per-worker", "2",
            "--port", "9000",
            "--max-batch-size", "16",
            "--max-batch-delay-ms", "5",
            "--input-shape", "3,224,224",
            "--input-dtype", "float16",
            "--timeout-s", "2.5",
            "--trust-pickle",
        ],
        environ={},
    )  # fmt: skip
    assert settings.model == str(weights)
    assert settings.model_class == "mypkg.nets:ResNet"
    assert settings.model_kwargs == {"depth": 18}
    assert settings.workers == 4
    assert settings.cores_per_worker == 2
    assert settings.port == 9000
    assert settings.max_batch_size == 16
    assert settings.max_batch_delay_ms == 5.0
    assert settings.input_shape == (3, 224, 224)
    assert settings.input_dtype == "float16"
    assert settings.timeout_s == 2.5
    assert settings.trust_pickle is True
    assert settings.served_name == "resnet"


def test_environment_is_the_fallback() -> None:
    settings = parse_settings(
        ServeSettings,
        [],
        environ={"TORCHPOOL_WORKERS": "3", "TORCHPOOL_TRUST_PICKLE": "yes", "OTHER": "x"},
    )
    assert settings.workers == 3
    assert settings.trust_pickle is True


def test_flag_beats_environment() -> None:
    settings = parse_settings(ServeSettings, ["--workers", "5"], environ={"TORCHPOOL_WORKERS": "3"})
    assert settings.workers == 5


def test_every_field_has_a_flag_and_an_env_var() -> None:
    for f in settings_fields(ServeSettings):
        assert f.metadata["help"].strip()
        assert flag(f.name) == "--" + f.name.replace("_", "-")
        assert env_name(f.name) == "TORCHPOOL_" + f.name.upper()
    assert flag("max_batch_size") == "--max-batch-size"
    assert env_name("max_batch_size") == "TORCHPOOL_MAX_BATCH_SIZE"


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--workers", "two"], {}, "--workers"),
        ([], {"TORCHPOOL_WORKERS": "two"}, "TORCHPOOL_WORKERS"),
        (["--max-batch-delay-ms", "soon"], {}, "--max-batch-delay-ms"),
        (["--input-shape", "3,a"], {}, "--input-shape"),
        ([], {"TORCHPOOL_INPUT_SHAPE": "0,3"}, "TORCHPOOL_INPUT_SHAPE"),
        ([], {"TORCHPOOL_TRUST_PICKLE": "maybe"}, "TORCHPOOL_TRUST_PICKLE"),
        (["--model-kwargs", "{not json"], {}, "--model-kwargs"),
        ([], {"TORCHPOOL_PORT": "80.5"}, "TORCHPOOL_PORT"),
    ],
)
def test_unparsable_value_names_its_source(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_settings(ServeSettings, argv, environ=environ)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--workers", "-1"], "--workers"),
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-batch-delay-ms", "-1"], "--max-batch-delay-ms"),
        (["--max-body-mb", "0"], "--max-body-mb"),
        (["--heartbeat-s", "0"], "--heartbeat-s"),
        (["--heartbeat-liveness", "0"], "--heartbeat-liveness"),
        (["--cores-per-worker", "0"], "--cores-per-worker"),
        (["--queue-size", "-1"], "--queue-size"),
        (["--timeout-s", "0"], "--timeout-s"),
        (["--min-ready", "0"], "--min-ready"),
        (["--drain-timeout-s", "-1"], "--drain-timeout-s"),
        (["--log-level", "loud"], "--log-level"),
        (["--input-dtype", "float128"], "--input-dtype"),
        (["--device", "tpu"], "--device"),
        (["--model-class", "not a path", "--model", "x"], "--model-class"),
        (["--handler", "nocolon"], "--handler"),
        (["--model-class", "pkg:Net"], "--model-class"),
        (["--model-kwargs", '{"a": 1}'], "--model-kwargs"),
        (["--model-kwargs", "[1, 2]"], "--model-kwargs"),
        (["--handler", "pkg:H", "--model-class", "pkg:Net", "--model", "x"], "--handler"),
    ],
)
def test_invalid_setting_names_the_flag(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_settings(ServeSettings, argv, environ={})


def test_batch_limit_defaults_to_the_request_timeout() -> None:
    assert parse_settings(ServeSettings, ["--timeout-s", "7"], environ={}).batch_limit_s == 7
    limited = parse_settings(ServeSettings, [], environ={"TORCHPOOL_MAX_BATCH_SECONDS": "2.5"})
    assert limited.batch_limit_s == 2.5
    never = parse_settings(ServeSettings, ["--max-batch-seconds", "0"], environ={})
    assert never.batch_limit_s is None
    with pytest.raises(ConfigError, match="--max-batch-seconds"):
        parse_settings(ServeSettings, ["--max-batch-seconds=-1"], environ={})


def test_empty_model_kwargs_is_the_same_as_none() -> None:
    assert parse_settings(ServeSettings, ["--model-kwargs", "{}"], environ={}).model_kwargs == {}


def test_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        parse_settings(ServeSettings, ["--model", str(tmp_path / "nope.pt")], environ={})


def test_parse_shape() -> None:
    assert parse_shape("16") == (16,)
    assert parse_shape("3,224,224") == (3, 224, 224)
    assert parse_shape("3x224x224") == (3, 224, 224)
    assert parse_shape(" [3, 224, 224] ") == (3, 224, 224)
    assert parse_shape("-1,16") == (-1, 16)
    assert parse_shape("") == ()
    for bad in ("0", "3,-2", "a,b", "1.5"):
        with pytest.raises(ConfigError):
            parse_shape(bad)


def test_negative_shape_flag_needs_equals_form() -> None:
    # argparse reads a separate "-1,16" as an option, so the README documents "=".
    settings = parse_settings(ServeSettings, ["--input-shape=-1,16"], environ={})
    assert settings.input_shape == (-1, 16)
    assert parse_settings(ServeSettings, ["--input-shape", "-1"], environ={}).input_shape == (-1,)


def test_parse_cores() -> None:
    assert parse_cores("0-3,6") == (0, 1, 2, 3, 6)
    assert parse_cores("5") == (5,)
    assert parse_cores("0, 2-3,") == (0, 2, 3)
    assert parse_cores("") == ()
    with pytest.raises(ConfigError):
        parse_cores("a-b")


def test_parse_device() -> None:
    assert parse_device("cpu") == DeviceSpec("cpu")
    assert parse_device(" CUDA ") == DeviceSpec("cuda")
    assert parse_device("auto") == DeviceSpec("auto")
    assert parse_device("cuda:1") == DeviceSpec("cuda", (1,))
    assert parse_device("cuda:0,2") == DeviceSpec("cuda", (0, 2))
    assert parse_device("cuda:0,cuda:2") == DeviceSpec("cuda", (0, 2))
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0,cpu", ""):
        with pytest.raises(ConfigError, match="--device"):
            parse_device(bad)


def test_worker_argv_of_defaults_is_empty() -> None:
    assert worker_argv(ModelSettings()) == []
    assert worker_argv(ServeSettings()) == []


def test_worker_argv_round_trips(tmp_path: Path) -> None:
    weights = tmp_path / "net.pt"
    weights.write_bytes(b"x")
    serve = ServeSettings(
        model=str(weights),
        model_class="pkg.mod:Net",
        model_kwargs={"hidden": 64, "names": ["a b", "c"]},
        trust_pickle=True,
        model_name="my-net",
        input_shape=(-1, 16),
        input_dtype="int64",
        device="cuda:0,2",
        max_batch_size=32,
        max_batch_delay_ms=0.5,
        max_body_mb=1.5,
        heartbeat_s=0.25,
        workers=7,
        port=9999,
    )
    argv = worker_argv(serve)
    worker = parse_settings(WorkerSettings, [*argv, *CONNECT], environ={})
    for f in settings_fields(ModelSettings):
        assert getattr(worker, f.name) == getattr(serve, f.name), f.name
    # Only model settings travel; pool and HTTP settings stay with the gateway.
    assert "--workers" not in " ".join(argv)
    assert "--port" not in " ".join(argv)


def test_worker_argv_ignores_the_workers_environment(tmp_path: Path) -> None:
    argv = worker_argv(ModelSettings(handler="pkg:Handler", model_kwargs={"k": 1}))
    worker = parse_settings(
        WorkerSettings, [*argv, *CONNECT], environ={"TORCHPOOL_MAX_BATCH_SIZE": "4"}
    )
    assert worker.handler == "pkg:Handler"
    assert worker.model_kwargs == {"k": 1}
    # What the gateway did not pass (a default) falls back to the environment.
    assert worker.max_batch_size == 4


def test_worker_settings() -> None:
    worker = parse_settings(
        WorkerSettings,
        [*CONNECT, "--uid", "1.0", "--slot", "1", "--cores", "0-1", "--gpu", "2"],
        environ={},
    )
    assert worker.uid == "1.0"
    assert worker.slot == 1
    assert worker.cores == (0, 1)
    assert worker.gpu == 2
    with pytest.raises(ConfigError, match="--connect"):
        parse_settings(WorkerSettings, [], environ={})
    with pytest.raises(ConfigError, match="--cores"):
        parse_settings(WorkerSettings, [*CONNECT, "--cores", ","], environ={})


def test_access_log_is_off_unless_asked_for() -> None:
    assert parse_settings(ServeSettings, [], environ={}).access_log is False
    assert parse_settings(ServeSettings, ["--access-log"], environ={}).access_log is True
    on = parse_settings(ServeSettings, [], environ={"TORCHPOOL_ACCESS_LOG": "true"})
    assert on.access_log is True and on.server_settings().access_log is True
