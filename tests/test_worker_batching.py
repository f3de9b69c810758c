"""Fast tier: batch collection, grouping, splitting and culprit isolation, no sockets."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
import torch

from shared.errors import ModelFailure
from tests.models import Mean, PairNet, Picky
from worker.model.assembly import Assembly, split_output
from worker.serve.batching import Job, collect, group, run_group
from worker.serve.pacing import Pacer

pytestmark = pytest.mark.fast


def job(request_id: int, rows: int = 1, width: int = 2, dtype: torch.dtype = torch.float32) -> Job:
    return Job(request_id, "json", torch.full((rows, width), float(request_id), dtype=dtype))


class Arrivals:
    """A fake data socket: ``waiting`` is there now; ``later`` arrives while one waits."""

    def __init__(self, waiting: list[Job], later: list[Job] | None = None) -> None:
        self.waiting = deque(waiting)
        self.later = deque(later or [])
        self.timeouts: list[float] = []

    def __call__(self, timeout_s: float) -> Job | None:
        self.timeouts.append(timeout_s)
        if self.waiting:
            return self.waiting.popleft()
        if timeout_s > 0 and self.later:
            return self.later.popleft()
        return None


def ids(jobs: list[Job]) -> list[int]:
    return [j.request_id for j in jobs]


def test_lone_request_never_waits() -> None:
    arrivals = Arrivals([job(1)], later=[job(2)])
    batch = collect(deque(), arrivals, max_rows=8, pacer=Pacer(1.0))
    assert ids(batch) == [1]
    assert all(t == 0 for t in arrivals.timeouts)


def test_load_waits_for_more_up_to_the_delay() -> None:
    arrivals = Arrivals([job(1), job(2)], later=[job(3)])
    batch = collect(deque(), arrivals, max_rows=8, pacer=Pacer(0.5))
    assert ids(batch) == [1, 2, 3]
    assert any(t > 0 for t in arrivals.timeouts)


def test_rows_cap_and_leftover_goes_first_next_time() -> None:
    pending: deque[Job] = deque()
    arrivals = Arrivals([job(1, rows=3), job(2, rows=3), job(3, rows=3), job(4)])
    assert ids(collect(pending, arrivals, max_rows=8, pacer=Pacer(0.0))) == [1, 2]
    assert ids(list(pending)) == [3]
    assert ids(collect(pending, arrivals, max_rows=8, pacer=Pacer(0.0))) == [3, 4]


def test_oversized_request_runs_alone() -> None:
    arrivals = Arrivals([job(1, rows=20), job(2)])
    pending: deque[Job] = deque()
    assert ids(collect(pending, arrivals, max_rows=8, pacer=Pacer(0.0))) == [1]


def test_batch_size_one_takes_one() -> None:
    arrivals = Arrivals([job(1), job(2)])
    assert ids(collect(deque(), arrivals, max_rows=1, pacer=Pacer(1.0))) == [1]
    assert arrivals.timeouts == [0.0]


def test_group_by_row_shape_and_dtype() -> None:
    jobs = [job(1), job(2, width=3), job(3), job(4, dtype=torch.float64), job(5, width=3)]
    assert [ids(g) for g in group(jobs)] == [[1, 3], [2, 5], [4]]


def test_split_keeps_order_and_structure() -> None:
    inputs = [torch.full((n, 2), float(i)) for i, n in enumerate([1, 3, 2])]
    results = run_group(PairNet(), inputs)
    for tensor, result in zip(inputs, results, strict=True):
        want = PairNet()(tensor)
        torch.testing.assert_close(result["sum"], want["sum"])
        assert isinstance(result["parts"], tuple)
        torch.testing.assert_close(result["parts"][0], want["parts"][0])
        torch.testing.assert_close(result["parts"][1], want["parts"][1])


def test_split_refuses_what_cannot_be_cut() -> None:
    assert split_output(torch.zeros(3, 2), [1, 1]) is None
    assert split_output(torch.tensor(1.0), [1]) is None
    assert split_output({"a": torch.zeros(2), "b": 3}, [1, 1]) is None  # a batch-wide number
    assert split_output([], [1, 1]) is None


def test_unsplittable_output_falls_back_to_one_forward_each() -> None:
    calls: list[int] = []

    def forward(x: torch.Tensor) -> Any:
        calls.append(int(x.shape[0]))
        return Mean()(x)

    inputs = [torch.ones(2, 2), torch.zeros(1, 2)]
    results = run_group(forward, inputs)
    assert calls == [3, 2, 1]
    torch.testing.assert_close(results[0], torch.ones(1, 2))
    torch.testing.assert_close(results[1], torch.zeros(1, 2))


def test_only_the_culprit_fails() -> None:
    inputs = [torch.ones(1, 2), -torch.ones(2, 2), torch.full((1, 2), 2.0)]
    results = run_group(Picky(), inputs)
    torch.testing.assert_close(results[0], torch.full((1, 2), 2.0))
    assert isinstance(results[1], ModelFailure)
    assert results[1].message == "ValueError: negative input"
    torch.testing.assert_close(results[2], torch.full((1, 2), 3.0))


def test_single_input_runs_once_without_concatenation() -> None:
    calls: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return x * 2

    tensor = torch.ones(3, 2)
    (result,) = run_group(forward, [tensor])
    assert len(calls) == 1 and calls[0] is tensor
    torch.testing.assert_close(result, tensor * 2)


@pytest.mark.parametrize(
    "make", [lambda: torch.ones(1, 2), lambda: torch.ones(1, 2, dtype=torch.int64)]
)
def test_runs_under_inference_mode(make: Callable[[], torch.Tensor]) -> None:
    seen: list[bool] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_inference_mode_enabled())
        return x

    run_group(forward, [make(), make()])
    assert seen == [True]


# --- static leaves: strings, numbers, booleans and None beside the tensors ----------


def tokens(request_id: int, length: int, modality: Any = "text") -> Job:
    inputs = {
        "input_ids": torch.full((1, length), request_id, dtype=torch.int64),
        "attention_mask": torch.ones((1, length), dtype=torch.int64),
        "modality": modality,
    }
    return Job(request_id, "json", inputs)


def test_requests_batch_only_with_equal_static_leaves() -> None:
    padded = Assembly(pad_values=0)
    jobs = [tokens(1, 3), tokens(2, 4, "image"), tokens(3, 4), tokens(4, 3, None)]
    assert [ids(g) for g in group(jobs, padded)] == [[1, 3], [2], [4]]


def test_predict_gets_static_leaves_as_they_are_and_rows_padded() -> None:
    seen: list[dict[str, Any]] = []

    def forward(batch: dict[str, Any]) -> dict[str, Any]:
        seen.append(batch)
        return {"rows": batch["input_ids"].sum(dim=1), "modality": batch["modality"]}

    padded = Assembly(pad_values={"input_ids": 0, "attention_mask": 0})
    jobs = [tokens(1, 2), tokens(2, 3)]
    results = run_group(forward, [j.inputs for j in jobs], padded)
    assert len(seen) == 1, "the two requests ran in one forward pass"
    assert seen[0]["modality"] == "text"
    assert seen[0]["input_ids"].shape == (2, 3)
    assert [r["rows"].tolist() for r in results] == [[2], [6]]
    assert [r["modality"] for r in results] == ["text", "text"]


def test_split_gives_strings_to_every_request_but_never_splits_a_number() -> None:
    parts = split_output({"y": torch.arange(3), "kind": "text", "none": None}, [1, 2])
    assert parts is not None
    assert [p["kind"] for p in parts] == ["text", "text"]
    assert [p["none"] for p in parts] == [None, None]
    assert [p["y"].tolist() for p in parts] == [[0], [1, 2]]
    # A number may be computed over the whole batch: run each request alone instead.
    assert split_output({"y": torch.arange(3), "loss": 0.5}, [1, 2]) is None
