"""The cycle collector's settings once the server is up (gateway/serve.py, collect_less)."""

from __future__ import annotations

import gc

from gateway.serve import collect_less


def test_start_up_objects_are_frozen_and_young_ones_collected_less_often() -> None:
    before = gc.get_threshold()
    built_at_start = [object() for _ in range(10)]
    try:
        collect_less()
        assert gc.get_freeze_count() >= len(built_at_start)
        assert gc.get_threshold() == (5000, 20, 20)
        garbage = []
        garbage.append(garbage)  # a cycle made after start-up is still collected
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
