"""Read TensorBoard event files back (tests assert on what a person would see)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(log_root: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under `log_root` (every run directory), tag -> [(step, value)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for events in Path(log_root).rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return series
