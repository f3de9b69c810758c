"""Placement: disjoint core sets per worker, GPUs round-robin, all without torch."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from gateway.pool.placement import Placement, choose_gpus, format_cores, plan, split_cores
from shared import protocol
from shared.config import ConfigError
from shared.devices import visible_gpus
from worker import pinning

pytestmark = pytest.mark.fast

EIGHT = list(range(8))


def test_split_cores_evenly() -> None:
    assert split_cores(EIGHT, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert split_cores(EIGHT, 4) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert split_cores(EIGHT, 1) == [tuple(EIGHT)]
    assert split_cores([2, 3, 6, 7], 2) == [(2, 3), (6, 7)]


def test_leftover_cores_stay_unassigned() -> None:
    sets = split_cores(EIGHT, 3)
    assert sets == [(0, 1), (2, 3), (4, 5)]
    assert split_cores(EIGHT, 3, per_worker=1) == [(0,), (1,), (2,)]


def test_sets_are_disjoint_when_they_fit() -> None:
    for workers in range(1, 9):
        sets = split_cores(EIGHT, workers)
        flat = [core for cores in sets for core in cores]
        assert len(flat) == len(set(flat))
        assert all(len(cores) == len(sets[0]) for cores in sets)


def test_more_workers_than_cores_round_robin(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="torchpool.placement"):
        assert split_cores([0, 1], 5) == [(0,), (1,), (0,), (1,), (0,)]
    assert "share cores" in caplog.text


def test_cores_per_worker() -> None:
    assert split_cores(EIGHT, 2, per_worker=3) == [(0, 1, 2), (3, 4, 5)]
    assert split_cores(EIGHT, 2, per_worker=4) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_cores_per_worker_too_large() -> None:
    with pytest.raises(ConfigError, match="--cores-per-worker 3 needs 9 cores; only 8"):
        split_cores(EIGHT, 3, per_worker=3)


def test_zero_workers_and_no_cores() -> None:
    assert split_cores(EIGHT, 0) == []
    assert split_cores([], 0) == []
    with pytest.raises(ConfigError, match="no usable CPU cores"):
        split_cores([], 1)


def test_visible_gpus_from_environment(tmp_path: Path) -> None:
    empty = tmp_path / "none"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,2"}, empty) == [0, 2]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 3 , 1 "}, empty) == [3, 1]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, empty) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, empty) == []
    # CUDA stops at the first entry it cannot read.
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,GPU-1234,2"}, empty) == [1]


def test_visible_gpus_environment_wins_over_proc(tmp_path: Path) -> None:
    proc = tmp_path / "gpus"
    for address in ("0000:01:00.0", "0000:02:00.0"):
        (proc / address).mkdir(parents=True)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1"}, proc) == [1]


def test_visible_gpus_from_proc(tmp_path: Path) -> None:
    proc = tmp_path / "gpus"
    for address in ("0000:01:00.0", "0000:02:00.0", "0000:81:00.0"):
        (proc / address).mkdir(parents=True)
    assert visible_gpus({}, proc) == [0, 1, 2]
    assert visible_gpus({}, tmp_path / "missing") == []


def test_plan_cpu() -> None:
    placements = plan(2, "cpu", cores=EIGHT, gpus=[0, 1])
    assert placements == [
        Placement(slot=0, device="cpu", gpu=None, cores=(0, 1, 2, 3)),
        Placement(slot=1, device="cpu", gpu=None, cores=(4, 5, 6, 7)),
    ]
    assert [p.label for p in placements] == ["cpu", "cpu"]


def test_plan_gpu_list_round_robin() -> None:
    placements = plan(5, "cuda:0,2", cores=EIGHT, gpus=[0, 1, 2, 3])
    assert [p.gpu for p in placements] == [0, 2, 0, 2, 0]
    assert [p.label for p in placements] == ["cuda:0", "cuda:2", "cuda:0", "cuda:2", "cuda:0"]
    assert all(p.device == "cuda" for p in placements)
    assert [p.slot for p in placements] == [0, 1, 2, 3, 4]
    # GPU workers still get disjoint cores for their host-side work.
    assert [len(p.cores) for p in placements] == [1, 1, 1, 1, 1]


def test_plan_all_visible_gpus() -> None:
    placements = plan(3, "cuda", cores=EIGHT, gpus=[1, 3])
    assert [p.gpu for p in placements] == [1, 3, 1]


def test_plan_cuda_without_gpus_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no GPU"):
        plan(1, "cuda", cores=EIGHT, gpus=[])


def test_plan_auto() -> None:
    assert [p.gpu for p in plan(2, "auto", cores=EIGHT, gpus=[0])] == [0, 0]
    on_cpu = plan(2, "auto", cores=EIGHT, gpus=[])
    assert [(p.device, p.gpu) for p in on_cpu] == [("cpu", None), ("cpu", None)]


def test_plan_cores_per_worker_and_zero_workers() -> None:
    assert [p.cores for p in plan(2, "cpu", per_worker=1, cores=EIGHT, gpus=[])] == [(0,), (1,)]
    assert plan(0, "cpu", cores=[], gpus=[]) == []
    with pytest.raises(ConfigError, match="--device"):
        plan(1, "tpu", cores=EIGHT, gpus=[])


def test_format_cores() -> None:
    assert format_cores([0, 1, 2, 5]) == "0-2,5"
    assert format_cores([7, 3, 4, 4]) == "3-4,7"
    assert format_cores([5]) == "5"
    assert format_cores([]) == ""
    assert format_cores(range(16)) == "0-15"


def test_cgroup_quota_caps_usable_cores(tmp_path: Path) -> None:
    from gateway.pool.placement import cgroup_cpu_quota, usable_cores

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_quota(cpu_max) is None
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_quota(cpu_max) == 1
    assert len(usable_cores(cpu_max)) == 1
    assert cgroup_cpu_quota(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("device", "visible", "physical"),
    [
        ("cuda:0", [1, 3], 1),
        ("cuda:1", [1, 3], 3),
        ("cuda:1,0", [2, 5, 7], 5),
        ("cuda:2", [0, 1, 2], 2),
    ],
)
def test_cuda_n_is_the_nth_visible_gpu_for_the_gateway_and_a_remote_worker(
    device: str, visible: list[int], physical: int
) -> None:
    """With CUDA_VISIBLE_DEVICES=1,3, cuda:1 is physical GPU 3, in the gateway's placement
    and in a remote worker's own pinning alike (torch's and CUDA's numbering)."""
    assert choose_gpus(device, visible)[0] == physical
    assert pinning.choose_gpu(device, None, visible) == ("cuda", physical)


def test_cuda_n_past_the_visible_gpus_is_refused_alike() -> None:
    with pytest.raises(ConfigError, match="only 2 GPUs are visible, so cuda:2") as gateway:
        choose_gpus("cuda:2", [1, 3])
    with pytest.raises(ConfigError) as worker:
        pinning.choose_gpu("cuda:2", None, [1, 3])
    assert str(worker.value) == str(gateway.value)
    # The gateway's own --gpu for a local worker is already physical.
    assert pinning.choose_gpu("cuda", 3, [1, 3]) == ("cuda", 3)


# --- when a worker is pinned -------------------------------------------------------------------


class Affinity:
    """A fake CPU mask for os.sched_{get,set}affinity: every call recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cores: set[int]) -> None:
        self.cores = cores
        self.calls: list[tuple[int, set[int]]] = []
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(self.cores))
        monkeypatch.setattr(os, "sched_setaffinity", self.set)
        # apply() sets these: set then removed here, so monkeypatch restores each at the end.
        names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CUDA_VISIBLE_DEVICES")
        for name in (*names, *protocol.THREAD_ENV_VARS):
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)

    def set(self, pid: int, cores: Iterable[int]) -> None:
        self.calls.append((pid, set(cores)))


def test_an_elastic_cpu_worker_is_pinned_only_after_torch_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    affinity = Affinity(monkeypatch, {0, 1})
    pin = pinning.apply([1], "cpu", None, elastic=True)
    # Not yet: GNU OpenMP, loading with torch, must count both cores.
    assert affinity.calls == [] and pin.deferred
    assert pin.cores == (1,) and pin.threads == 1 and pin.host == (0, 1)
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["GOMP_SPINCOUNT"] == str(pinning.ELASTIC_SPINCOUNT)
    monkeypatch.setattr(os, "listdir", lambda path: ["100", "101"])
    pinning.pin_every_thread(pin.cores)
    assert affinity.calls == [(100, {1}), (101, {1})]


@pytest.mark.parametrize("elastic", [False, True])
def test_a_worker_that_never_borrows_is_pinned_before_torch_loads(
    monkeypatch: pytest.MonkeyPatch, elastic: bool
) -> None:
    affinity = Affinity(monkeypatch, {0, 1})
    device = "cpu" if not elastic else "cuda"
    monkeypatch.setattr(pinning, "visible_gpus", lambda: [0])
    pin = pinning.apply([0], device, 0 if elastic else None, elastic=elastic)
    assert affinity.calls == [(0, {0})] and not pin.deferred
    assert "GOMP_SPINCOUNT" not in os.environ


def test_a_wait_policy_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    Affinity(monkeypatch, {0, 1})
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    pinning.apply([0], "cpu", None, elastic=True)
    assert "GOMP_SPINCOUNT" not in os.environ
