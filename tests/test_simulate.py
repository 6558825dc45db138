"""The step simulator on synthetic programs (no graphs, no torch)."""

import pytest
from hypothesis import given, settings, strategies as st

from lohan_compile.plan.simulate import (
    QUEUES,
    Alloc,
    Compute,
    Free,
    Issue,
    Sharing,
    SimulationError,
    Wait,
    simulate,
)


def test_compute_runs_in_order():
    t = simulate([Compute("a", 1.0), Compute("b", 2.0)])
    assert t.step_seconds == pytest.approx(3.0)
    assert t.interval("b").start == pytest.approx(1.0)


def test_transfer_hidden_behind_compute_is_not_exposed():
    t = simulate([Issue("x", "d2h", 1.0), Compute("c", 2.0), Wait("x")])
    assert t.step_seconds == pytest.approx(2.0)
    assert t.exposed["x"] == pytest.approx(0.0)


def test_transfer_longer_than_compute_is_exposed():
    t = simulate([Issue("x", "h2d", 3.0), Compute("c", 1.0), Wait("x"), Compute("d", 1.0)])
    assert t.exposed["x"] == pytest.approx(2.0)
    assert t.step_seconds == pytest.approx(4.0)
    assert t.interval("d").start == pytest.approx(3.0)


def test_one_queue_runs_items_in_issue_order():
    t = simulate([Issue("a", "d2h", 1.0), Issue("b", "d2h", 1.0), Wait("b")])
    assert t.interval("a").end == pytest.approx(1.0)
    assert t.interval("b").start == pytest.approx(1.0) and t.step_seconds == pytest.approx(2.0)


def test_links_are_full_duplex():
    t = simulate([Issue("a", "d2h", 1.0), Issue("b", "h2d", 1.0), Wait("a"), Wait("b")])
    assert t.step_seconds == pytest.approx(1.0)


def test_sharing_slows_both_while_they_overlap():
    sharing = Sharing(compute_slowdown={"d2h": 1.0}, queue_slowdown={"d2h": 1.0})
    t = simulate([Issue("x", "d2h", 1.0), Compute("c", 1.0), Wait("x")], sharing=sharing)
    # both run at half speed for their whole overlap
    assert t.interval("c").end == pytest.approx(2.0)
    assert t.interval("x").end == pytest.approx(2.0)
    # after compute ends the copy speeds up again
    t = simulate([Issue("x", "d2h", 2.0), Compute("c", 1.0), Wait("x")], sharing=sharing)
    assert t.interval("c").end == pytest.approx(2.0)  # 1 s of work at half speed
    assert t.interval("x").end == pytest.approx(3.0)  # 1 s done by t=2, the last 1 s alone


def test_memory_peak_and_curve():
    t = simulate(
        [Alloc("a", 100), Compute("c1", 1.0), Alloc("b", 50), Free("a"), Alloc("h", 30, "host"), Compute("c2", 1.0), Free("b")],
        initial={"device": 10},
    )
    assert t.peaks["device"] == 160 and t.peak_at["device"] == pytest.approx(1.0)
    assert t.peaks["host"] == 30
    assert t.curves["device"][-1][1] == 10


@pytest.mark.parametrize(
    "program, message",
    [
        ([Wait("x")], "before it was issued"),
        ([Issue("x", "d2h", 1.0), Issue("x", "d2h", 1.0)], "issued twice"),
        ([Free("a")], "freed but not allocated"),
        ([Alloc("a", 1), Alloc("a", 1)], "allocated twice"),
    ],
)
def test_malformed_programs_are_refused(program, message):
    with pytest.raises(SimulationError, match=message):
        simulate(program)


def test_unknown_queue_and_tier():
    with pytest.raises(ValueError):
        Issue("x", "pcie", 1.0)
    with pytest.raises(ValueError):
        Alloc("x", 1, "gpu")


@st.composite
def programs(draw):
    ops, issued, live, n = [], [], [], draw(st.integers(1, 40))
    for i in range(n):
        kind = draw(st.sampled_from(["compute", "issue", "wait", "alloc", "free"]))
        if kind == "compute":
            ops.append(Compute(f"c{i}", draw(st.floats(0, 2))))
        elif kind == "issue":
            ops.append(Issue(f"t{i}", draw(st.sampled_from(QUEUES)), draw(st.floats(0, 2))))
            issued.append(f"t{i}")
        elif kind == "wait" and issued:
            ops.append(Wait(draw(st.sampled_from(issued))))
        elif kind == "alloc":
            ops.append(Alloc(f"b{i}", draw(st.integers(0, 1000))))
            live.append(f"b{i}")
        elif kind == "free" and live:
            ops.append(Free(live.pop(draw(st.integers(0, len(live) - 1)))))
    return ops


@settings(max_examples=200, deadline=None)
@given(programs(), st.floats(0, 2), st.floats(0, 2))
def test_timeline_properties(program, cs, qs):
    sharing = Sharing(compute_slowdown={q: cs for q in QUEUES}, queue_slowdown={q: qs for q in QUEUES})
    t = simulate(program, sharing=sharing)
    compute = sum(op.seconds for op in program if isinstance(op, Compute))
    per_queue = {q: sum(op.seconds for op in program if isinstance(op, Issue) and op.queue == q) for q in QUEUES}
    eps = 1e-9 * max(1.0, t.step_seconds)
    # nothing finishes faster than it would alone, and sharing never makes things free
    assert t.step_seconds >= compute - eps
    assert all(t.step_seconds >= v - eps for v in per_queue.values())
    if cs == 0 and qs == 0:
        assert t.step_seconds <= compute + sum(per_queue.values()) + eps
    # one resource runs one thing at a time, in program order
    for r in ("compute",) + QUEUES:
        spans = [i for i in t.intervals if i.resource == r]
        for a, b in zip(spans, spans[1:]):
            assert b.start >= a.end - eps
    # a wait never ends before what it waits for
    issued = {op.name: op for op in program if isinstance(op, Issue)}
    for name, blocked in t.exposed.items():
        assert blocked >= -eps and t.interval(name).end <= t.step_seconds + eps
    assert set(t.exposed) == {op.name for op in program if isinstance(op, Wait)}
    # memory: the peak is the running maximum of the curve
    assert t.peaks["device"] == max(b for _, b in t.curves["device"])
    assert all(isinstance(issued[n], Issue) for n in t.exposed)


def test_an_item_waits_for_the_items_it_comes_after():
    # a weight read from SSD (2 s) then sent to the device (1 s); an update after a gradient copy
    t = simulate([
        Issue("read", "ssd_read", 2.0),
        Issue("fetch", "h2d", 1.0, after=("read",)),
        Issue("grad", "d2h", 0.5),
        Issue("update", "cpu", 1.0, after=("grad", "fetch")),
        Compute("c", 1.0),
        Wait("update"),
    ])
    assert t.interval("fetch").start == pytest.approx(2.0)
    assert t.interval("update").start == pytest.approx(3.0)
    assert t.step_seconds == pytest.approx(4.0)
    assert t.exposed["update"] == pytest.approx(3.0)


def test_an_item_after_one_not_yet_issued_is_refused():
    with pytest.raises(SimulationError, match="not issued before"):
        simulate([Issue("a", "h2d", 1.0, after=("b",)), Issue("b", "d2h", 1.0)])
