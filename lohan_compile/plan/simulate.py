"""A discrete-event simulator of one training step. Graph-free.

A step is a *program*: the operations the step thread runs, in order. Items are
named by any hashable value: a string, or a record (the planner names compute ops
by ``OpRef`` and copies by ``Transfer``, so that nothing parses a name back).

- ``Compute(name, seconds)``: work on the compute stream (``seconds`` is the
  time it takes with nothing running beside it).
- ``Issue(name, queue, seconds, after=(), nbytes=0)``: hand work to an asynchronous
  queue (``"d2h"``, ``"h2d"``, ``"cpu"`` for the CPU optimizer,
  ``"ssd_read"``, ``"ssd_write"``, ``"net"`` for collectives between the devices of a
  data-parallel step) and go on at once; the queue runs its work
  in issue order, one item at a time, and an item starts only once the items
  named in ``after`` (on other queues) have completed: a weight read from SSD
  before it crosses to the device, an update after its gradient arrived. An
  item still waiting for those does not hold up ready items behind it (the
  runtime hands a copy to its engine when its prerequisites are done). ``nbytes``: what
  it moves over its link, added up per queue in the timeline's ``moved``.
- ``Wait(name)``: block until the issued item ``name`` has completed.
- ``Alloc(buffer, bytes, tier)`` and ``Free(buffer)``: memory on a tier
  (``"device"``, ``"host"``, ``"ssd"``), at that moment of the step thread.

The simulator returns the timeline (when each item ran), the step time, the
time the step thread spent blocked in each wait (exposed transfer time), and
the memory curve and peak of each tier.

Sharing. On a GPU the compute stream and the copy engines are independent.
On the CPU stand-in, copies run on the same cores and memory bandwidth as
compute, and slow each other down: ``Sharing`` gives, per queue, how much
slower compute gets while that queue is busy and how much slower the queue
gets while compute runs. The simulation follows the changing rates exactly
(work is tracked in seconds-alone and drained at the current rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping, Sequence, Union

QUEUES = ("d2h", "h2d", "cpu", "ssd_read", "ssd_write", "net")
TIERS = ("device", "host", "ssd")


@dataclass(frozen=True)
class Compute:
    name: Hashable
    seconds: float


@dataclass(frozen=True)
class Issue:
    name: Hashable
    queue: str
    seconds: float  # time the item takes on its queue with nothing beside it
    after: tuple[Hashable, ...] = ()  # items that must complete before this one starts
    nbytes: int = 0  # bytes it moves over its link (0: work that moves none, such as an update)

    def __post_init__(self) -> None:
        if self.queue not in QUEUES:
            raise ValueError(f"unknown queue {self.queue!r}; queues are {QUEUES}")


@dataclass(frozen=True)
class Wait:
    name: Hashable


@dataclass(frozen=True)
class Alloc:
    buffer: str
    bytes: int
    tier: str = "device"

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}; tiers are {TIERS}")


@dataclass(frozen=True)
class Free:
    buffer: str


Op = Union[Compute, Issue, Wait, Alloc, Free]


@dataclass(frozen=True)
class Sharing:
    """Mutual slowdown of compute and each queue when they run at the same time.

    ``compute_slowdown[q]``: compute takes (1 + s) times as long while queue q
    is busy. ``queue_slowdown[q]``: queue q takes (1 + s) times as long while
    compute runs. Zero everywhere (the default) means independent engines, as
    on a GPU.
    """

    compute_slowdown: Mapping[str, float] = field(default_factory=dict)
    queue_slowdown: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Interval:
    name: Hashable
    resource: str  # "compute" or a queue name
    start: float
    end: float


@dataclass
class Timeline:
    intervals: list[Interval]
    step_seconds: float
    exposed: dict[Hashable, float]  # wait name -> seconds the step thread was blocked
    peaks: dict[str, int]  # tier -> highest bytes in use
    curves: dict[str, list[tuple[float, int]]]  # tier -> (time, bytes in use) after each change
    peak_at: dict[str, float]  # tier -> first time the peak was reached
    moved: dict[str, int] = field(default_factory=dict)  # queue -> bytes its items moved

    @property
    def exposed_seconds(self) -> float:
        return sum(self.exposed.values())

    def busy(self, resource: str) -> float:
        """Seconds ``resource`` was busy: the union of its items' intervals. Items of one queue
        can overlap in time (an item that started is overtaken by one earlier in the queue whose
        prerequisites completed), so their durations do not simply add up."""
        total, end = 0.0, -math.inf
        for i in sorted((i for i in self.intervals if i.resource == resource), key=lambda i: i.start):
            if i.end > end:
                total += i.end - max(i.start, end)
                end = i.end
        return total

    def interval(self, name: Hashable) -> Interval:
        for i in self.intervals:
            if i.name == name:
                return i
        raise KeyError(name)


class SimulationError(ValueError):
    pass


@dataclass
class _Item:
    name: Hashable
    queue: str
    remaining: float
    issued_at: float
    after: tuple["_Item", ...] = ()
    start: float | None = None
    end: float | None = None


def simulate(
    program: Sequence[Op],
    *,
    sharing: Sharing | None = None,
    initial: Mapping[str, int] | None = None,
) -> Timeline:
    """Run ``program`` and return its timeline. ``initial`` is bytes resident per tier at the start."""
    sharing = sharing or Sharing()
    _validate(program)
    now = 0.0
    pc = 0  # next op of the step thread
    compute_left: float | None = None  # seconds-alone left of the running Compute
    compute_start = 0.0
    compute_name = ""
    waiting: str | None = None
    wait_start = 0.0
    queues: dict[str, list[_Item]] = {q: [] for q in QUEUES}
    items: dict[str, _Item] = {}
    intervals: list[Interval] = []
    exposed: dict[str, float] = {}
    moved: dict[str, int] = {}  # queue -> bytes issued on it
    sizes: dict[str, tuple[int, str]] = {}
    in_use = {t: int((initial or {}).get(t, 0)) for t in TIERS}
    peaks = dict(in_use)
    peak_at = {t: 0.0 for t in TIERS}
    curves: dict[str, list[tuple[float, int]]] = {t: [(0.0, in_use[t])] for t in TIERS}

    def change(tier: str, delta: int) -> None:
        in_use[tier] += delta
        curves[tier].append((now, in_use[tier]))
        if in_use[tier] > peaks[tier]:
            peaks[tier] = in_use[tier]
            peak_at[tier] = now

    def advance_step_thread() -> None:
        """Run zero-time ops until the step thread computes, blocks, or ends."""
        nonlocal pc, compute_left, compute_start, compute_name, waiting, wait_start
        while compute_left is None and waiting is None and pc < len(program):
            op = program[pc]
            pc += 1
            if isinstance(op, Compute):
                if op.seconds > 0:
                    compute_left = op.seconds
                    compute_start = now
                    compute_name = op.name
                else:
                    intervals.append(Interval(op.name, "compute", now, now))
            elif isinstance(op, Issue):
                item = _Item(op.name, op.queue, op.seconds, now, tuple(items[a] for a in op.after))
                items[op.name] = item
                moved[op.queue] = moved.get(op.queue, 0) + op.nbytes
                queues[op.queue].append(item)
            elif isinstance(op, Wait):
                item = items[op.name]
                if item.end is None:
                    waiting = op.name
                    wait_start = now
                else:
                    exposed[op.name] = 0.0
            elif isinstance(op, Alloc):
                sizes[op.buffer] = (op.bytes, op.tier)
                change(op.tier, op.bytes)
            elif isinstance(op, Free):
                nbytes, tier = sizes.pop(op.buffer)
                change(tier, -nbytes)

    advance_step_thread()
    while True:
        heads = {}
        for q, items_ in queues.items():
            # the first item whose prerequisites are done: one still waiting for its
            # prerequisites does not hold up the items behind it
            ready = next((it for it in items_ if all(d.end is not None for d in it.after)), None)
            if ready is not None:
                heads[q] = ready
        for item in heads.values():
            if item.start is None:
                item.start = now
        busy_queues = [q for q in heads]
        computing = compute_left is not None
        if not computing and not heads:
            blocked = [items_[0].name for items_ in queues.values() if items_]
            if blocked:
                raise SimulationError(f"queued items wait on each other forever: {blocked}")
            if waiting is not None:
                raise SimulationError(f"wait for {waiting!r} can never finish")
            break
        c_rate = 1.0 / (1.0 + sum(sharing.compute_slowdown.get(q, 0.0) for q in busy_queues))
        q_rate = {q: 1.0 / (1.0 + (sharing.queue_slowdown.get(q, 0.0) if computing else 0.0)) for q in heads}
        dt = math.inf
        if computing:
            dt = compute_left / c_rate
        for q, item in heads.items():
            dt = min(dt, item.remaining / q_rate[q])
        now += dt
        if computing:
            compute_left -= dt * c_rate
        for q, item in heads.items():
            item.remaining -= dt * q_rate[q]
        eps = 1e-12 * max(1.0, now)
        for q, item in heads.items():
            if item.remaining <= eps:
                item.end = now
                queues[q].remove(item)
                intervals.append(Interval(item.name, q, item.start, now))
                if waiting == item.name:
                    exposed[waiting] = now - wait_start
                    waiting = None
        if computing and compute_left <= eps:
            intervals.append(Interval(compute_name, "compute", compute_start, now))
            compute_left = None
        advance_step_thread()

    return Timeline(
        intervals=intervals,
        step_seconds=now,
        exposed=exposed,
        peaks=peaks,
        curves=curves,
        peak_at=peak_at,
        moved=moved,
    )


def _validate(program: Iterable[Op]) -> None:
    issued: set[str] = set()
    live: set[str] = set()
    for op in program:
        if isinstance(op, Issue):
            if op.name in issued:
                raise SimulationError(f"{op.name!r} issued twice")
            for dep in op.after:
                if dep not in issued:
                    raise SimulationError(f"{op.name!r} issued after {dep!r}, which was not issued before it")
            issued.add(op.name)
        elif isinstance(op, Wait):
            if op.name not in issued:
                raise SimulationError(f"wait for {op.name!r} before it was issued")
        elif isinstance(op, Alloc):
            if op.buffer in live:
                raise SimulationError(f"buffer {op.buffer!r} allocated twice")
            live.add(op.buffer)
        elif isinstance(op, Free):
            if op.buffer not in live:
                raise SimulationError(f"buffer {op.buffer!r} freed but not allocated")
            live.discard(op.buffer)
        elif not isinstance(op, Compute):
            raise SimulationError(f"not an op: {op!r}")
