"""Fast tier: what a handler sees (payloads, content types, casting) and how its
pytrees are padded, grouped, collated and split. No sockets, no processes."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
import pytest
import torch

from shared.errors import ModelFailure, RequestError, UnsupportedMediaType
from worker.codec import predict as codec
from worker.codec import rawbody
from worker.codec.inputs import InputSpec, Preprocess
from worker.model import handler
from worker.model.assembly import Assembly
from worker.serve.batching import MAX_PAD_RATIO, Job, group, run_group

pytestmark = pytest.mark.fast

LIMIT = 1 << 20


def tokens(text: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[ord(c) for c in text]])
    return {"ids": ids, "mask": torch.ones_like(ids)}


def spec(preprocess: Preprocess | None, **kwargs: Any) -> InputSpec:
    return InputSpec(torch.float32, None, LIMIT, preprocess, **kwargs)


# --- payloads and content types -------------------------------------------------


def test_json_payload_reaches_preprocess_unchanged() -> None:
    seen: list[tuple[Any, str]] = []

    def preprocess(payload: Any, content_type: str) -> dict[str, torch.Tensor]:
        seen.append((payload, content_type))
        return tokens("hi")

    body = orjson.dumps({"input_tensor": {"text": "hi", "n": [1, "x", None]}})
    inputs, _ = codec.JsonCodec(spec(preprocess)).decode({}, body)
    assert seen == [({"text": "hi", "n": [1, "x", None]}, "application/json")]
    assert inputs["ids"].dtype == torch.int64  # nothing cast


def multipart(*files: tuple[str, bytes, str], fields: dict[str, str] | None = None) -> bytes:
    lines: list[bytes] = []
    for name, value in (fields or {}).items():
        lines += [b"--XyZ", f'Content-Disposition: form-data; name="{name}"'.encode(), b""]
        lines.append(value.encode())
    for filename, data, ctype in files:
        disposition = f'form-data; name="file"; filename="{filename}"'
        lines += [b"--XyZ", f"Content-Disposition: {disposition}".encode()]
        lines += [f"Content-Type: {ctype}".encode(), b"", data]
    return b"\r\n".join([*lines, b"--XyZ--", b""])


def raw(preprocess: Preprocess | None, body: bytes, ctype: str, **kwargs: Any) -> Any:
    return rawbody.RawCodec(spec(preprocess, **kwargs)).decode({"ctype": ctype}, body)[0]


def test_raw_and_multipart_bodies_reach_preprocess_as_bytes() -> None:
    seen: list[tuple[Any, str]] = []

    def preprocess(payload: Any, content_type: str) -> torch.Tensor:
        seen.append((payload, content_type))
        return torch.zeros(1, 2)

    raw(preprocess, b"hello", "Text/Plain; charset=utf-8")
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256))
    body = multipart(("cat.jpg", jpeg, "image/jpeg"), fields={"note": "a cat"})
    raw(preprocess, body, "multipart/form-data; boundary=XyZ")
    assert seen == [(b"hello", "text/plain"), (jpeg, "image/jpeg")]


@pytest.mark.parametrize("count", [0, 2])
def test_multipart_needs_exactly_one_file(count: int) -> None:
    files = [(f"{i}.bin", b"x", "application/octet-stream") for i in range(count)]
    body = multipart(*files, fields={"note": "n"})
    with pytest.raises(RequestError, match=f"exactly one file field.*has {count}"):
        raw(lambda p, c: torch.zeros(1), body, "multipart/form-data; boundary=XyZ")
    with pytest.raises(RequestError, match="no boundary"):
        raw(lambda p, c: torch.zeros(1), body, "multipart/form-data")


def test_accepts_and_models_without_preprocess_answer_415() -> None:
    accepts = ("image/*", "text/plain")
    assert raw(lambda p, c: torch.zeros(1, 1), b"x", "image/png", accepts=accepts).shape == (1, 1)
    with pytest.raises(UnsupportedMediaType) as info:
        raw(lambda p, c: torch.zeros(1, 1), b"x", "audio/wav", accepts=accepts)
    assert info.value.status == 415
    assert info.value.message == "this model accepts image/*, text/plain; the body is audio/wav"
    with pytest.raises(UnsupportedMediaType, match="this model takes tensors"):
        raw(None, b"1,2,3", "text/csv")


def test_preprocess_signature_is_read_once() -> None:
    class One:
        def preprocess(self, payload: Any) -> Any:
            return ("one", payload)

    class Two:
        def preprocess(self, payload: Any, content_type: str) -> Any:
            return ("two", payload, content_type)

    one, two = handler.preprocess_hook(One()), handler.preprocess_hook(Two())
    assert one is not None and two is not None
    assert one(b"x", "text/plain") == ("one", b"x")
    assert two(b"x", "text/plain") == ("two", b"x", "text/plain")
    assert handler.preprocess_hook(object()) is None


def test_preprocess_errors_are_400_and_bad_results_model_failures() -> None:
    def broken(payload: Any, content_type: str) -> Any:
        raise ValueError("not a JPEG")

    with pytest.raises(RequestError, match="preprocess rejected the input: ValueError: not a JPEG"):
        raw(broken, b"x", "image/jpeg")
    with pytest.raises(ModelFailure, match="str"):
        raw(lambda p, c: {"a": "text"}, b"x", "image/jpeg")
    with pytest.raises(ModelFailure, match="same first dimension"):
        raw(lambda p, c: {"a": torch.zeros(1, 2), "b": torch.zeros(2, 2)}, b"x", "image/jpeg")


def test_casting_only_when_asked_and_only_floating_leaves_in_a_pytree() -> None:
    def make(payload: Any, content_type: str) -> Any:
        return {"ids": torch.tensor([[1, 2]]), "pixels": torch.zeros(1, 2, dtype=torch.float64)}

    plain = raw(lambda p, c: torch.zeros(1, 2, dtype=torch.float64), b"x", "a/b")
    assert plain.dtype == torch.float64
    tree = raw(make, b"x", "a/b")
    assert (tree["ids"].dtype, tree["pixels"].dtype) == (torch.int64, torch.float64)
    asked = InputSpec(torch.float16, None, LIMIT, make, dtype_asked=True)
    tree = rawbody.RawCodec(asked).decode({"ctype": "a/b"}, b"x")[0]
    assert (tree["ids"].dtype, tree["pixels"].dtype) == (torch.int64, torch.float16)
    asked = InputSpec(torch.float16, None, LIMIT, lambda p, c: torch.ones(1, 2), dtype_asked=True)
    assert rawbody.RawCodec(asked).decode({"ctype": "a/b"}, b"x")[0].dtype == torch.float16


# --- variable-length batching ----------------------------------------------------


def job(request_id: int, inputs: Any) -> Job:
    return Job(request_id, "json", inputs)


def ids(groups: list[list[Job]]) -> list[list[int]]:
    return [[j.request_id for j in g] for g in groups]


def test_padding_per_key_then_concatenation_and_split_by_rows() -> None:
    assembly = Assembly(pad_values={"ids": 9})
    items = [
        tokens("ab"),
        tokens("abcd"),
        {"ids": torch.tensor([[1], [2]]), "mask": torch.ones(2, 1, dtype=torch.int64)},
    ]
    batch = assembly.combine(items)
    assert batch["ids"].tolist() == [[97, 98, 9, 9], [97, 98, 99, 100], [1, 9, 9, 9], [2, 9, 9, 9]]
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]

    def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"length": batch["mask"].sum(1), "hidden": batch["ids"].float()}

    results = run_group(forward, items, assembly)
    assert [r["length"].tolist() for r in results] == [[2], [4], [1, 1]]
    assert [tuple(r["hidden"].shape) for r in results] == [(1, 4), (1, 4), (2, 4)]  # padded


def test_groups_by_structure_dtype_shape_and_length() -> None:
    assembly = Assembly(pad_values=0)
    jobs = [
        job(1, tokens("a" * 4)),
        job(2, tokens("a" * 40)),
        job(3, {"ids": torch.zeros(1, 5)}),  # other keys
        job(4, tokens("a" * 6)),
        job(5, tokens("a" * 50)),
        job(6, {"ids": torch.zeros(1, 5, dtype=torch.int32), "mask": torch.zeros(1, 5)}),
        job(7, tokens("a" * 9)),  # > 1.5 x 4 (the shortest): a new length group
        job(8, (torch.zeros(1, 3, 7), torch.zeros(1))),
        job(9, (torch.zeros(1, 4, 2), torch.zeros(1))),  # a middle dim differs
    ]
    assert ids(group(jobs, assembly)) == [[1, 4], [7], [2, 5], [3], [6], [8], [9]]
    assert MAX_PAD_RATIO == 1.5
    # Without padding (a plain tensor model) only exact shapes batch together.
    plain = [job(1, torch.zeros(1, 4)), job(2, torch.zeros(1, 5)), job(3, torch.zeros(2, 4))]
    assert ids(group(plain)) == [[1, 3], [2]]


def test_collate_and_split_replace_padding_and_the_row_split() -> None:
    calls: list[Any] = []

    def collate(items: list[Any]) -> list[str]:
        calls.append(items)
        return [item for batch in items for item in batch]

    def split(output: list[str], counts: list[int]) -> list[list[str]]:
        return [output[: counts[0]], output[counts[0] :]] if len(counts) == 2 else [output]

    assembly = Assembly(collate=collate, split=split)

    def forward(batch: list[str]) -> list[str]:
        return [text.upper() for text in batch]

    # Leaves need a first dimension for the row count: tensors of strings' lengths here.
    items = [[torch.zeros(1)], [torch.zeros(2)]]
    results = run_group(lambda b: forward([str(t.shape[0]) for t in b]), items, assembly)
    assert len(calls) == 1 and results == [["1"], ["2"]]
    assert assembly.key(items[0]) == assembly.key({"other": torch.zeros(3)})


def test_a_failed_batched_forward_reruns_each_request_alone() -> None:
    calls: list[int] = []

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(int(batch["ids"].shape[0]))
        if bool((batch["ids"] == ord("!")).any()):
            raise ValueError("no shouting")
        return batch["mask"].sum(1)

    items = [tokens("ok"), tokens("no!"), tokens("fine")]
    results = run_group(forward, items, Assembly(pad_values=0))
    assert calls == [3, 1, 1, 1]
    assert results[0].tolist() == [2] and results[2].tolist() == [4]
    assert isinstance(results[1], ModelFailure) and "no shouting" in results[1].message


def test_handler_attributes_are_checked_at_load() -> None:
    class Declared:
        accepts = "Image/*"
        pad_values: ClassVar[dict[str, int]] = {"ids": 1}

    assert handler.accepts_of(Declared(), "m:C") == ("image/*",)
    assert handler.assembly_of(Declared(), "m:C", padded=True).pad_values == {"ids": 1}
    assert handler.assembly_of(object(), "m:C", padded=True).pad_values == 0
    assert handler.assembly_of(object(), "m:C", padded=False).pad_values is None

    class Bad:
        accepts: ClassVar[list[str]] = ["jpeg"]
        pad_values = "zero"

    with pytest.raises(Exception, match="accepts must be a list of content types"):
        handler.accepts_of(Bad(), "m:C")
    with pytest.raises(Exception, match="pad_values must be a number"):
        handler.assembly_of(Bad(), "m:C", padded=True)


# --- static leaves beside the tensors ---------------------------------------------


def test_strings_numbers_and_none_pass_through_preprocess_unchanged() -> None:
    def preprocess(payload: Any, content_type: str) -> dict[str, Any]:
        return {**tokens(payload), "modality": "text", "scale": 0.5, "flag": True, "tag": None}

    body = orjson.dumps({"input_tensor": "hi"})
    inputs, _ = codec.JsonCodec(spec(preprocess, dtype_asked=True)).decode({}, body)
    assert inputs["modality"] == "text"
    assert inputs["scale"] == 0.5 and inputs["flag"] is True and inputs["tag"] is None
    assert inputs["ids"].dtype == torch.int64  # integer leaves are never cast


@pytest.mark.parametrize(
    ("returned", "named"),
    [({"x": object()}, "object"), ({"modality": "text"}, "no tensor"), ({}, "empty")],
    ids=["object-leaf", "only-static", "empty"],
)
def test_preprocess_without_tensors_or_with_objects_is_a_model_failure(
    returned: dict[str, Any], named: str
) -> None:
    body = orjson.dumps({"input_tensor": "hi"})
    with pytest.raises(ModelFailure, match=named):
        codec.JsonCodec(spec(lambda payload, ctype: returned)).decode({}, body)
