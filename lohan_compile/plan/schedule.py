"""When a plan's copies run: the one scheduler every planner here uses. Graph-free.

Three questions, each answered once:

- ``op_timeline``: when each op of a step starts and ends if nothing stalls it (op
  times run back to back, with other compute, such as recomputations, before some ops);
- ``just_in_time``: at which op to issue each copy *to* the device (a swap-in, a
  parameter fetch) so that it arrives before it is needed, as late as the link allows:
  the link carries one copy at a time in issue order, so the walk goes backward from
  the last copy, and each must end before its own need and before the next one starts;
- ``release_points``: after which op to wait for each copy *from* the device (a
  swap-out, a gradient): once it is expected done, the link serving copies in order.

``schedule_swaps`` and ``schedule_fetches`` apply them to a ``Problem``'s swapped
candidates and streamed parameters; ``lohan plan``'s whole-step model applies them to
its own transfers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Hashable, Mapping, Sequence

from .problem import Action, Decision, Fetch, Problem, Rates, effective_first_use


def op_timeline(seconds: Sequence[float], before: Mapping[int, float] | None = None) -> tuple[list[float], list[float]]:
    """Start and end of each op run back to back, ``before[i]`` seconds of other compute
    running just before op ``i`` (no transfer stalls)."""
    before = before or {}
    starts, ends, now = [], [], 0.0
    for i, s in enumerate(seconds):
        now += before.get(i, 0.0)
        starts.append(now)
        now += s
        ends.append(now)
    return starts, ends


@dataclass(frozen=True)
class Inbound:
    """A copy to the device: needed before op ``need``, ``seconds`` on the link, never issued
    before op ``floor`` (its phase's first op); ``pinned``: issued at ``need`` (no prefetch)."""

    key: Hashable
    need: int
    seconds: float
    floor: int = 0
    pinned: bool = False


@dataclass(frozen=True)
class Outbound:
    """A copy from the device: made by op ``made``, ``seconds`` on the link, its storage still
    read until op ``not_before``; ``pinned``: waited for right after ``not_before``."""

    key: Hashable
    made: int
    seconds: float
    not_before: int
    pinned: bool = False


def just_in_time(starts: Sequence[float], inbound: Sequence[Inbound], *, slack: str = "when-late") -> dict[Hashable, int]:
    """The op before which each copy is issued. ``inbound`` is in link order (the order the
    copies are issued). Each is issued at the latest op that starts before the copy must
    begin, then one op earlier for slack (estimates are not exact): ``"when-late"`` only if
    that op starts after the copy should begin, ``"always"`` whenever its floor allows."""
    if slack not in ("when-late", "always"):
        raise ValueError(f"slack={slack!r}: 'when-late' or 'always'")
    out: dict[Hashable, int] = {}
    next_start = math.inf
    for t in reversed(inbound):
        at = t.need
        if t.pinned:
            out[t.key] = at
            next_start = starts[at]
            continue
        end = min(starts[t.need], next_start)
        begin = end - t.seconds
        next_start = begin
        while at > t.floor and starts[at - 1] >= begin:
            at -= 1
        if at > t.floor and (slack == "always" or starts[at] > begin):
            at -= 1
        out[t.key] = at
    return out


def release_points(ends: Sequence[float], outbound: Sequence[Outbound], *, last: int) -> dict[Hashable, int]:
    """The op after which each copy is waited for, never past op ``last``. ``outbound`` is in
    link order (the order the copies are made)."""
    out: dict[Hashable, int] = {}
    link_free = 0.0
    for t in outbound:
        done = max(ends[t.made], link_free) + t.seconds
        link_free = done
        at = max(t.made, t.not_before)
        while not t.pinned and at < last and ends[at] < done:
            at += 1
        out[t.key] = at
    return out


def problem_timeline(problem: Problem, decisions: Mapping[str, Decision] | None = None) -> tuple[list[float], list[float]]:
    """``op_timeline`` of a problem's ops, each recomputation of ``decisions`` running before
    the first backward op that needs it."""
    before: dict[int, float] = {}
    if decisions is not None:
        first_use = effective_first_use(problem, decisions)
        for c in problem.candidates:
            if decisions[c.key].action is Action.RECOMPUTE:
                before[first_use[c.key]] = before.get(first_use[c.key], 0.0) + (c.recompute_seconds or 0.0)
    return op_timeline([op.seconds for op in problem.ops], before)


def schedule_swaps(
    problem: Problem, decisions: dict[str, Decision], rates: Rates, *, prefetch: str = "just-in-time"
) -> dict[str, Decision]:
    """Fill in release and prefetch points of the swapped candidates.

    Swap-outs leave in production order and are waited for once expected done
    (``release_points``). ``just-in-time``: each swap-in is issued as late as the link lets it
    finish before its first use (``just_in_time``). ``one-ahead``: each swap-in is issued at the
    first use of the swapped candidate used just before it (a one-deep prefetch queue).
    """
    starts, ends = problem_timeline(problem, decisions)
    first_use = effective_first_use(problem, decisions)
    swapped = sorted(
        (c for c in problem.candidates if decisions[c.key].action is Action.SWAP), key=lambda c: c.produced_at
    )
    out = dict(decisions)
    release = release_points(ends, [
        Outbound(c.key, c.produced_at, c.bytes * rates.d2h_seconds_per_byte, c.last_fw_use, out[c.key].early_release)
        for c in swapped
    ], last=problem.n_fw - 1)
    for c in swapped:
        out[c.key] = replace(out[c.key], release_at=release[c.key])
    by_use = sorted(swapped, key=lambda c: first_use[c.key])
    if prefetch == "one-ahead":
        for prev, c in zip([None] + by_use[:-1], by_use):
            at = problem.n_fw if prev is None else min(first_use[prev.key], first_use[c.key])
            if out[c.key].late_prefetch:
                at = first_use[c.key]
            out[c.key] = replace(out[c.key], prefetch_at=at)
        return out
    issue = just_in_time(starts, [
        Inbound(c.key, first_use[c.key], c.bytes * rates.h2d_seconds_per_byte, problem.n_fw, out[c.key].late_prefetch)
        for c in by_use
    ])
    for c in by_use:
        out[c.key] = replace(out[c.key], prefetch_at=issue[c.key])
    return out


def schedule_fetches(problem: Problem, rates: Rates) -> list[Fetch]:
    """Issue points of the streamed parameters' fetches: each as late as the link (one fetch at a
    time, in order of first use) lets it finish before its first use, always one op earlier for
    slack, and never before its phase begins (a backward fetch is an op of the backward graph)."""
    starts, _ = problem_timeline(problem)
    # the walk runs from the last first use back; equal first uses keep the problem's order
    walk = sorted(problem.fetches, key=lambda f: f.first_use, reverse=True)
    issue = just_in_time(starts, [
        Inbound(i, f.first_use, f.bytes * rates.h2d_seconds_per_byte, 0 if f.phase == "fw" else problem.n_fw)
        for i, f in reversed(list(enumerate(walk)))
    ], slack="always")
    out = [replace(f, issue_at=issue[i]) for i, f in enumerate(walk)]
    return sorted(out, key=lambda f: (f.first_use, f.input_index))
