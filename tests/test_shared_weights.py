"""One copy of the weights per host: published once, mapped copy-on-write, cleaned up.

In-process tests load each model kind twice into one weights folder (the
first load publishes, the second maps) and compare the answers with a
private load. Real-process tests check what the issue asks of a running
pool: both workers map the same file, a worker that writes to its weights
changes only its own answers, files go when the model is unloaded or
reloaded, and a gateway killed with SIGKILL leaves nothing behind once the
next one starts.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shared import modelconfig
from shared.config import ModelSettings
from tests import sharing_zoo, zoo
from tests.conftest import Server, gone, wait_for
from worker.model.loading import LoadedModel, load_model

CPU = torch.device("cpu")
ADMIN = {"Authorization": "Bearer admin-t"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return zoo.build_all(tmp_path_factory.mktemp("models"))


def kinds(files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "torchscript": {"model": str(files["torchscript"])},
        "export": {"model": str(files["exported"])},
        "state_dict": {"model": str(files["weights"]), "model_class": "tests.zoo:TinyMLP"},
        "pickle": {"model": str(files["pickled"]), "trust_pickle": True},
        "handler": {"handler": "tests.sharing_zoo:LinearHandler"},
    }


def answer(model: LoadedModel, rows: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model.run(rows)
    return out


@pytest.mark.parametrize("kind", ["torchscript", "export", "state_dict", "pickle", "handler"])
def test_every_kind_answers_the_same_shared_or_not(
    kind: str, files: dict[str, Any], tmp_path: Path
) -> None:
    flags = kinds(files)[kind]
    rows = torch.randn(5, zoo.ROW, generator=torch.Generator().manual_seed(1))
    private = load_model(ModelSettings(no_shared_weights=True, **flags), CPU)
    publisher = load_model(ModelSettings(weights_dir=str(tmp_path), **flags), CPU)
    mapper = load_model(ModelSettings(weights_dir=str(tmp_path), **flags), CPU)
    assert private.sharing is not None and not private.sharing.shared
    assert private.sharing.reason == "--no-shared-weights"
    for model in (publisher, mapper):
        assert model.sharing is not None and model.sharing.shared, model.sharing
        assert torch.equal(answer(model, rows), answer(private, rows))
    assert publisher.sharing is not None and mapper.sharing is not None
    if kind == "state_dict":
        # The model file itself is the mapping: nothing is published.
        assert "model file" in publisher.sharing.reason
        assert not list(tmp_path.glob("*.weights"))
        return
    assert not publisher.sharing.mapped and mapper.sharing.mapped
    assert publisher.sharing.file == mapper.sharing.file
    assert [p.name for p in tmp_path.glob("*.weights")] == [Path(mapper.sharing.file or "").name]
    # Every parameter of the mapper is a view of the one mapping.
    assert mapper.mapped is not None
    start = torch.frombuffer(mapper.mapped.mapping, dtype=torch.uint8, count=1).data_ptr()
    end = start + mapper.mapped.nbytes
    for root in mapper.roots.values():
        for parameter in root.parameters():
            assert start <= parameter.data_ptr() < end


def test_torchscript_mapper_loads_a_skeleton(files: dict[str, Any], tmp_path: Path) -> None:
    flags = kinds(files)["torchscript"]
    load_model(ModelSettings(weights_dir=str(tmp_path), **flags), CPU)
    mapper = load_model(ModelSettings(weights_dir=str(tmp_path), **flags), CPU)
    assert mapper.sharing is not None and "skeleton" in mapper.sharing.reason
    assert mapper.mapped is not None and mapper.mapped.skeleton is not None
    # The skeleton holds the structure only: far smaller than the weights.
    assert len(mapper.mapped.skeleton) < Path(flags["model"]).stat().st_size


def test_a_write_to_a_mapped_weight_stays_in_its_process(tmp_path: Path) -> None:
    settings = ModelSettings(weights_dir=str(tmp_path), handler="tests.sharing_zoo:LinearHandler")
    first = load_model(settings, CPU)
    second = load_model(settings, CPU)
    weight = second.roots["model"].weight
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(first.roots["model"].weight, sharing_zoo.seeded_linear().weight)
    third = load_model(settings, CPU)
    assert torch.equal(third.roots["model"].weight, sharing_zoo.seeded_linear().weight)


def test_tensors_that_map_a_file_already_are_not_published_again(tmp_path: Path) -> None:
    weights = tmp_path / "linear.pt"
    torch.save(sharing_zoo.seeded_linear().state_dict(), weights)
    folder = tmp_path / "shared"
    settings = ModelSettings(
        weights_dir=str(folder),
        handler="tests.sharing_zoo:MappedHandler",
        model_kwargs={"weights": str(weights)},
    )
    first, second = load_model(settings, CPU), load_model(settings, CPU)
    for model in (first, second):
        assert model.sharing is not None and model.sharing.shared
        assert str(weights) in model.sharing.reason
    assert not list(folder.glob("*.weights"))
    rows = torch.randn(2, sharing_zoo.ROW)
    assert torch.equal(answer(second, rows), sharing_zoo.seeded_linear()(rows))


def test_without_a_weights_dir_it_loads_privately_and_says_why(files: dict[str, Any]) -> None:
    model = load_model(ModelSettings(model=str(files["torchscript"])), CPU)
    assert model.sharing is not None and not model.sharing.shared
    assert "--weights-dir" in model.sharing.reason


# --- real processes -------------------------------------------------------------------


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    """An empty --weights-cache (the servers' logs sit beside it)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


def mapped_files(pid: int) -> set[str]:
    """The weights files process ``pid`` maps, from /proc/PID/maps."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.endswith(".weights")}


def bumper(serve: Callable[..., Server], shm: Path, *extra: str) -> Server:
    return serve(
        "--workers", "2", "--handler", "tests.sharing_zoo:Bumper", "--max-batch-size", "1",
        "--weights-cache", str(shm), "--admin-token", "admin-t", "--model-name", "bump",
        *extra, ready=2,
    )  # fmt: skip


def test_two_workers_map_one_file_and_each_writes_only_its_own_copy(
    serve: Callable[..., Server], shm: Path
) -> None:
    server = bumper(serve, shm)
    workers = server.health()["workers"]
    files_ = {w["weights"]["file"] for w in workers}
    assert len(files_) == 1 and all(w["weights"]["shared"] for w in workers)
    (published,) = files_
    assert sorted(w["weights"]["mapped"] for w in workers) == [False, True]
    for worker in workers:
        assert mapped_files(worker["pid"]) == {published}
        assert worker["pss_bytes"] > 0 and worker["private_bytes"] > 0
        assert worker["pss_bytes"] == worker["private_bytes"] + worker["shared_pss_bytes"]
    base = float(sharing_zoo.seeded_linear().weight.double().sum())
    numel = sharing_zoo.ROW * 4
    seen: dict[int, list[float]] = {}
    for _ in range(12):
        response = server.predict({"input_tensor": [[0.0] * sharing_zoo.ROW]})
        assert response.status_code == 200, response.text
        total, pid = response.json()["prediction"][0]
        seen.setdefault(int(pid), []).append(total)
    for pid, totals in seen.items():
        # Warm-up bumped once; each answer is one more bump of this worker's own copy.
        want = [base + numel * (n + 2) for n in range(len(totals))]
        assert totals == pytest.approx(want), (pid, totals)
    metrics = server.get("/metrics").text
    assert 'torchpool_worker_pss_bytes{model="bump",worker="0"}' in metrics
    assert 'torchpool_worker_shared_weights{model="bump",worker="1"} 1.0' in metrics


def test_a_replacement_maps_the_published_weights(
    serve: Callable[..., Server], shm: Path, files: dict[str, Any]
) -> None:
    server = serve(
        "--workers", "2", "--model", str(files["torchscript"]), "--weights-cache", str(shm),
        ready=2,
    )  # fmt: skip
    before = {w["id"]: w for w in server.health()["workers"]}
    victim = before[1]["pid"]
    signal_kill(victim)

    def replaced() -> dict[str, Any] | None:
        worker = server.health()["workers"][1]
        fresh = worker["state"] == "ready" and worker["pid"] not in (None, victim)
        return worker if fresh else None

    worker = wait_for(replaced, 60, "a replacement worker")
    assert worker["weights"]["mapped"] and "skeleton" in worker["weights"]["reason"]
    assert worker["weights"]["file"] == before[0]["weights"]["file"]
    rows = torch.randn(3, zoo.ROW, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = files["model"](rows)
    for _ in range(4):
        got = torch.tensor(server.predict({"input_tensor": rows.tolist()}).json()["prediction"])
        assert torch.allclose(got, want, atol=1e-6)


def signal_kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 30, f"pid {pid} to exit")


def weight_files(shm: Path) -> list[Path]:
    return sorted(shm.glob("torchpool-weights-*/*/*.weights"))


def test_unload_and_reload_remove_the_model_files(serve: Callable[..., Server], shm: Path) -> None:
    server = bumper(serve, shm)
    (first,) = weight_files(shm)
    reload = server.client.post("/admin/models/bump/reload", headers=ADMIN, timeout=120)
    assert reload.status_code == 200, reload.text
    (second,) = weight_files(shm)
    assert not first.exists() and first.parent != second.parent
    files_ = {w["weights"]["file"] for w in server.health()["workers"]}
    assert files_ == {str(second)}
    unload = server.client.delete("/admin/models/bump", headers=ADMIN, timeout=60)
    assert unload.status_code in (200, 204), unload.text
    wait_for(lambda: not second.parent.exists(), 30, "the unloaded model's folder to go")
    (own,) = shm.glob("torchpool-weights-*")
    assert own.is_dir()  # the gateway's own folder stays while it runs
    assert server.stop() == 0
    assert not list(shm.iterdir())


def test_a_gateway_killed_with_sigkill_leaves_nothing_after_the_next_start(
    serve: Callable[..., Server], shm: Path
) -> None:
    killed = bumper(serve, shm)
    pids = killed.worker_pids()
    assert weight_files(shm)
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    for pid in pids:  # the workers follow their parent
        wait_for(functools.partial(gone, pid), 30, f"worker {pid} to exit")
    (left,) = shm.glob("torchpool-weights-*")
    assert weight_files(shm)  # nothing could remove them yet
    after = bumper(serve, shm)
    assert not left.exists()
    (own,) = shm.glob("torchpool-weights-*")
    assert str(after.health()["workers"][0]["weights"]["file"]).startswith(str(own))
    assert after.stop() == 0
    assert not list(shm.iterdir())


def test_no_shared_weights_loads_privately_and_health_says_why(
    serve: Callable[..., Server], shm: Path, files: dict[str, Any]
) -> None:
    server = serve(
        "--workers", "1", "--model", str(files["torchscript"]), "--weights-cache", str(shm),
        env={"TORCHPOOL_NO_SHARED_WEIGHTS": "1"},
    )  # fmt: skip
    (worker,) = server.health()["workers"]
    assert worker["weights"]["load_s"] > 0
    assert {**worker["weights"], "load_s": 0} == {
        "shared": False,
        "reason": "--no-shared-weights",
        "file": None,
        "bytes": 0,
        "mapped": False,
        "load_s": 0,
    }
    assert not weight_files(shm)
    assert "weights private (not shared): --no-shared-weights" in server.log()


def test_health_documents_pss_beside_rss(demo_server: Server) -> None:
    document = demo_server.health()
    gateway = document["gateway"]
    assert gateway["pss_bytes"] > 0 and gateway["private_bytes"] > 0
    for worker in document["workers"]:
        assert worker["pss_bytes"] > 0 and worker["rss_bytes"] >= worker["pss_bytes"]
        assert worker["weights"]["shared"] is False
        assert "demo" in worker["weights"]["reason"]
    json.dumps(document)


def test_a_config_file_turns_sharing_off_per_model_and_names_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "torchpool.toml"
    path.write_text(
        '[server]\nweights_cache = "/var/tmp"\n[models.a]\nno_shared_weights = true\n[models.b]\n'
    )
    config = modelconfig.load(path)
    assert config.server.weights_cache == "/var/tmp"
    assert config.models["a"].no_shared_weights and not config.models["b"].no_shared_weights
