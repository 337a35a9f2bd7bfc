"""Once the node has started, the collector leaves its long-lived objects alone and runs
its young passes less often (see node.core.collector for what that saved)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from node.core.collector import YOUNG_PASS_EVERY, settle_collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settling_freezes_what_exists_and_spaces_young_passes(restored_collector: None) -> None:
    long_lived = [{"kept": index} for index in range(1000)]
    settle_collector()
    assert gc.get_freeze_count() >= len(long_lived)
    assert gc.get_threshold()[0] == YOUNG_PASS_EVERY
    assert gc.isenabled(), "cycles are still collected"
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
