"""Fast tier: the start-up heap is collected once, then left out of later collections."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.heap import freeze_startup_heap

pytestmark = pytest.mark.fast


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_garbage_is_collected_and_what_lives_is_frozen(unfrozen: None) -> None:
    cycle = _Node()
    cycle.peer = _Node()
    cycle.peer.peer = cycle
    dead = weakref.ref(cycle)
    del cycle  # only a reference cycle keeps it: garbage for the collector
    kept = _Node()
    freeze_startup_heap()
    assert dead() is None  # collected, not frozen with the rest
    assert gc.get_freeze_count() > 0
    # What lived at the freeze is in no generation a collection walks.
    assert not any(obj is kept for obj in gc.get_objects())
