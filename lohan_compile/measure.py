"""Measuring a training step's device-tier peak on the CPU stand-in.

DESIGN.md's method: build the model and run a few steps under
``torch.profiler.profile(activities=[CPU], profile_memory=True)``; add up the
allocation events in time order, following blocks by address (a free of a
block the session never saw allocated is ignored); the peak is the highest
point of that running sum inside the last step, so everything resident
(parameters, buffers, optimizer state, leftovers of earlier steps) counts.

Host-tier memory comes from lohan's memory manager, outside the c10
allocator, so it is not in these events: on a CPU-only machine they count the
device tier alone. The profiler only sees the thread that runs the step.
The profiler slows a step by about a third: compare step *times* with
unprofiled runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile, record_function

T = TypeVar("T")

_STEP = "lohan_measure_step_"


@dataclass(frozen=True)
class PeakMeasurement:
    peak_bytes: int  # highest device bytes in use during the last step
    start_bytes: int  # device bytes in use when the last step began
    end_bytes: int  # ... and when it ended
    step_peaks: tuple[int, ...]  # the peak of every measured step


def _flatten(events):
    stack = list(events)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.children)


def measure_device_peak(build: Callable[[], T], step: Callable[[T], Any], *, steps: int = 2) -> PeakMeasurement:
    """Peak device bytes of ``step(state)`` after ``state = build()``, both under the profiler."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = build()
        for i in range(steps):
            with record_function(f"{_STEP}{i}"):
                step(state)
    events = list(_flatten(prof.profiler.kineto_results.experimental_event_tree()))
    ranges = {}
    for e in events:
        if e.name.startswith(_STEP):
            ranges[int(e.name[len(_STEP):])] = (e.start_time_ns, e.start_time_ns + e.duration_time_ns)
    allocs = sorted(
        (e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr)
        for e in events
        if e.tag == torch._C._profiler._EventType.Allocation
    )
    live: dict[int, int] = {}
    total = 0
    timeline: list[tuple[int, int]] = []
    for t, size, ptr in allocs:
        if size > 0:
            live[ptr] = live.get(ptr, 0) + size
            total += size
        elif ptr in live:
            total -= live.pop(ptr)
        else:
            continue  # freed here, allocated before this session
        timeline.append((t, total))

    def level_at(t: int) -> int:
        current = 0
        for when, value in timeline:
            if when > t:
                break
            current = value
        return current

    peaks = []
    for i in range(steps):
        start, end = ranges[i]
        inside = [v for when, v in timeline if start <= when <= end]
        peaks.append(max([level_at(start)] + inside))
    start, end = ranges[steps - 1]
    return PeakMeasurement(
        peak_bytes=peaks[-1], start_bytes=level_at(start), end_bytes=level_at(end), step_peaks=tuple(peaks)
    )
