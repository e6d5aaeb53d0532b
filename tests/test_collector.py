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
        # 200 streams in flight hold some 20,000 young objects: their allocation alone must not
        # set off a collection, which would walk them all (~3 ms, every ~120 streams)
        collections: list[int] = []

        def count(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                collections.append(info["generation"])

        gc.collect()  # (start counting from an empty youngest generation)
        gc.callbacks.append(count)
        try:
            in_flight = [[] for _ in range(20_000)]
        finally:
            gc.callbacks.remove(count)
        assert collections == [] and len(in_flight) == 20_000
        garbage = []
        garbage.append(garbage)  # a cycle made after start-up is still collected
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
