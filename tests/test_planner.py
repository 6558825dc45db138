"""Planner policies on synthetic problems (no graphs, no torch)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lohan_compile.errors import BudgetError
from lohan_compile.plan.problem import Action, Buffer, Candidate, OpInfo, Problem, Rates, Transfer
from lohan_compile.plan.policies import AUTO_FAMILIES, auto, keep_all, minimal_memory_plan, recompute_all, solve, swap_all
from lohan_compile.plan.program import program_for
from lohan_compile.plan.schedule import schedule_swaps
from lohan_compile.plan.simulate import Issue, Sharing, Wait


def layered_problem(layers=4, act_bytes=100, op_s=1.0, recompute_s=0.5, temp_bytes=10):
    """A chain of layers: each forward op saves one activation that the mirrored backward op reads."""
    ops = [OpInfo(f"f{i}", op_s, "fw") for i in range(layers)] + [OpInfo(f"b{i}", op_s, "bw") for i in range(layers)]
    n_fw = layers
    buffers, candidates = {}, []
    for i in range(layers):
        key = f"fw:a{i}"
        use = 2 * layers - 1 - i
        buffers[key] = Buffer(key, act_bytes, i, use)
        candidates.append(Candidate(key, f"a{i}", act_bytes, i, min(i + 1, layers - 1), use, use,
                                    recompute_s, (f"fw:a{i-1}",) if i else ()))
        t = f"fw:t{i}"
        buffers[t] = Buffer(t, temp_bytes, i, i)
    for j in range(layers):
        g = f"bw:g{j}"
        buffers[g] = Buffer(g, 1, layers + j, None)  # gradients outlive the step
    return Problem(ops, n_fw, buffers, candidates, resident_bytes=50, fw_seconds=layers * op_s, bw_seconds=layers * op_s)


FAST = Rates(d2h_seconds_per_byte=1e-6, h2d_seconds_per_byte=1e-6)
SLOW = Rates(d2h_seconds_per_byte=1e-1, h2d_seconds_per_byte=1e-1)


def test_keep_all_peak_is_everything_saved_at_the_turn():
    p = layered_problem()
    plan = keep_all(p, FAST, None)
    # resident + 4 activations + the last forward temporary, at the end of forward
    assert plan.prediction.peak_device_bytes == 50 + 4 * 100 + 10
    assert plan.prediction.step_seconds == pytest.approx(8.0)
    assert plan.prediction.d2h_bytes == 0


def test_swap_all_hides_transfers_on_a_fast_link_and_lowers_the_peak():
    p = layered_problem()
    plan = swap_all(p, FAST, None)
    assert plan.count(Action.SWAP) == 4
    # only the activation produced last is exposed: forward must wait for its copy before returning
    assert plan.prediction.exposed_seconds <= 2 * 100 * 1e-6 + 1e-9
    assert plan.prediction.peak_device_bytes < keep_all(p, FAST, None).prediction.peak_device_bytes
    assert plan.prediction.d2h_bytes == plan.prediction.h2d_bytes == 400
    assert plan.prediction.peak_host_bytes > 0


def test_swap_all_on_a_slow_link_is_exposed():
    plan = swap_all(layered_problem(), SLOW, None)
    assert plan.prediction.exposed_seconds > 1.0


def test_recompute_all_never_chains_recomputations():
    p = layered_problem()
    plan = recompute_all(p, FAST, None)
    chosen = {k for k, d in plan.decisions.items() if d.action is Action.RECOMPUTE}
    assert chosen
    for c in p.candidates:
        if c.key in chosen:
            assert not set(c.recompute_needs) & chosen
    assert plan.prediction.recompute_seconds == pytest.approx(0.5 * len(chosen))


def test_auto_meets_the_budget_with_free_swaps_on_a_fast_link():
    p = layered_problem()
    full = keep_all(p, FAST, None).prediction.peak_device_bytes
    plan = auto(p, FAST, budget=full - 150)
    assert plan.prediction.peak_device_bytes <= full - 150
    assert plan.prediction.step_seconds == pytest.approx(8.0, rel=1e-3)  # nothing exposed, nothing recomputed


def test_auto_prefers_recomputation_when_the_link_is_slow():
    p = layered_problem()
    full = keep_all(p, SLOW, None).prediction.peak_device_bytes
    plan = auto(p, SLOW, budget=full - 150)
    assert plan.prediction.peak_device_bytes <= full - 150
    assert plan.count(Action.RECOMPUTE) >= 1
    for fixed in (swap_all, recompute_all):
        other = fixed(p, SLOW, None)
        if other.prediction.peak_device_bytes <= full - 150:
            assert plan.prediction.step_seconds <= other.prediction.step_seconds + 1e-9


def test_auto_lists_the_plans_that_fit_and_makes_the_one_asked_for():
    p = layered_problem()
    budget = keep_all(p, SLOW, None).prediction.peak_device_bytes - 150
    chosen = auto(p, SLOW, budget)
    # every plan that fits, with its predicted step; the chosen one is the fastest of them
    assert chosen.family in chosen.alternatives and len(chosen.alternatives) >= 2
    assert chosen.prediction.step_seconds == pytest.approx(min(chosen.alternatives.values()))
    for family, seconds in chosen.alternatives.items():
        plan = solve("auto", p, SLOW, budget, family)
        assert plan.family == family and plan.policy == "auto"
        assert plan.prediction.step_seconds == pytest.approx(seconds)
        assert plan.prediction.peak_device_bytes <= budget
    with pytest.raises(ValueError, match="families"):
        auto(p, SLOW, budget, family="fastest")
    # no budget, or one that everything kept fits: keep-all is the only plan
    assert auto(p, SLOW, None).alternatives.keys() == {"keep-all"}


def test_autos_swap_all_waits_earlier_for_the_copies_held_at_the_peak_to_fit():
    """On a slow link swap-all's copies out are waited for late (after the ops that hide
    them), so its peak holds them; auto's swap-all plan waits earlier for those at the peak
    until it fits a budget the fixed policy misses, still swapping everything."""
    p = layered_problem()
    plain = swap_all(p, SLOW, None)
    budget = plain.prediction.peak_device_bytes - 1
    assert minimal_memory_plan(p, SLOW).prediction.peak_device_bytes <= budget
    with pytest.raises(BudgetError):
        solve("swap-all", p, SLOW, budget)
    plan = auto(p, SLOW, budget, family="swap-all")
    assert plan.prediction.peak_device_bytes <= budget and plan.count(Action.SWAP) == len(p.candidates)
    changed = [k for k, d in plan.decisions.items() if d.early_release or d.late_prefetch]
    assert 0 < len(changed) < len(p.candidates)  # only those at the peak, not minimal-memory's all


def test_auto_weighs_a_plan_that_recomputes_where_copies_would_only_hide():
    """Where swapping hides behind compute, auto's greedy plan swaps; its second greedy plan
    counts every copy's whole time and recomputes what is cheaper to redo (a cheap chain),
    and each is among auto's plans, so a trial can measure which is faster on the machine."""
    p = layered_problem(layers=4, act_bytes=100, op_s=1.0, recompute_s=0.05)
    budget = keep_all(p, FAST, None).prediction.peak_device_bytes - 150
    rates = Rates(d2h_seconds_per_byte=1e-3, h2d_seconds_per_byte=1e-3)  # 0.2 s a round trip: hidden
    greedy = auto(p, rates, budget, family="greedy")
    recompute_first = auto(p, rates, budget, family="greedy-recompute")
    assert greedy.count(Action.SWAP) > 0 and greedy.count(Action.RECOMPUTE) == 0
    # (each layer's activation is recomputed from the one before: those two cannot both be)
    assert recompute_first.count(Action.RECOMPUTE) > 0
    assert recompute_first.prediction.d2h_bytes < greedy.prediction.d2h_bytes
    for plan in (greedy, recompute_first):
        assert plan.prediction.peak_device_bytes <= budget
    assert {"greedy", "greedy-recompute"} <= set(auto(p, rates, budget).alternatives)


def test_a_plan_asked_for_that_misses_the_budget_raises():
    p = layered_problem()
    budget = keep_all(p, SLOW, None).prediction.peak_device_bytes - 150
    missing = [f for f in AUTO_FAMILIES
               if f not in auto(p, SLOW, budget).alternatives]
    assert missing, "the problem should have a plan that misses this budget"
    with pytest.raises(BudgetError, match=missing[0]) as e:
        auto(p, SLOW, budget, family=missing[0])
    assert e.value.smallest_feasible_bytes > budget


def test_infeasible_budget_raises_with_the_smallest_feasible_budget():
    p = layered_problem()
    smallest = minimal_memory_plan(p, FAST).prediction.peak_device_bytes
    with pytest.raises(BudgetError) as e:
        auto(p, FAST, budget=60)
    assert e.value.smallest_feasible_bytes is not None and e.value.smallest_feasible_bytes <= smallest
    assert str(e.value.smallest_feasible_bytes) in str(e.value)
    # that budget is then feasible
    assert auto(p, FAST, budget=e.value.smallest_feasible_bytes).prediction.peak_device_bytes <= e.value.smallest_feasible_bytes


def test_fixed_policy_over_budget_raises():
    p = layered_problem()
    with pytest.raises(BudgetError, match="keep-all"):
        solve("keep-all", p, FAST, budget=100)


@st.composite
def problems(draw):
    layers = draw(st.integers(1, 12))
    ops = [OpInfo(f"f{i}", draw(st.floats(0.01, 2.0)), "fw") for i in range(layers)]
    ops += [OpInfo(f"b{i}", draw(st.floats(0.01, 2.0)), "bw") for i in range(layers)]
    buffers, cands = {}, []
    for i in range(layers):
        key = f"fw:a{i}"
        first = draw(st.integers(layers, 2 * layers - 1))
        last = draw(st.integers(first, 2 * layers - 1))
        nbytes = draw(st.integers(1, 1000))
        buffers[key] = Buffer(key, nbytes, i, last)
        re = draw(st.one_of(st.none(), st.floats(0.0, 2.0)))
        needs = (f"fw:a{draw(st.integers(0, i - 1))}",) if i and re is not None and draw(st.booleans()) else ()
        cands.append(Candidate(key, f"a{i}", nbytes, i, draw(st.integers(i, layers - 1)), first, last, re, needs,
                               swappable=draw(st.booleans())))
    return Problem(ops, layers, buffers, cands, resident_bytes=draw(st.integers(0, 100)),
                   fw_seconds=sum(o.seconds for o in ops[:layers]), bw_seconds=sum(o.seconds for o in ops[layers:]))


rates = st.builds(
    Rates,
    d2h_seconds_per_byte=st.floats(1e-6, 1e-2),
    h2d_seconds_per_byte=st.floats(1e-6, 1e-2),
    sharing=st.sampled_from([Sharing(), Sharing({"d2h": 0.5, "h2d": 0.5}, {"d2h": 0.5, "h2d": 0.5})]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), rates, st.floats(0.0, 1.0))
def test_auto_meets_any_budget_it_accepts(problem, r, fraction):
    full = keep_all(problem, r, None).prediction.peak_device_bytes
    floor = minimal_memory_plan(problem, r).prediction.peak_device_bytes
    budget = int(floor + fraction * (full - floor))
    try:
        plan = auto(problem, r, budget)
    except BudgetError as e:
        assert e.smallest_feasible_bytes > budget
        return
    assert plan.prediction.peak_device_bytes <= budget
    for fixed in (keep_all, swap_all, recompute_all):
        other = fixed(problem, r, None)
        if other.prediction.peak_device_bytes <= budget:
            assert plan.prediction.step_seconds <= other.prediction.step_seconds * (1 + 1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), rates)
def test_swap_in_is_issued_after_its_swap_out_completes(problem, r):
    d = {c.key: (swap_all(problem, r, None).decisions[c.key]) for c in problem.candidates}
    d = schedule_swaps(problem, d, r)
    program = program_for(problem, d, r)
    position = {}
    for i, op in enumerate(program):
        if isinstance(op, (Issue, Wait)):
            position.setdefault((type(op).__name__, op.name), i)
    for c in problem.candidates:
        if d[c.key].action is Action.SWAP:
            out_wait = position[("Wait", Transfer("swap_out", c.key))]
            in_issue = position[("Issue", Transfer("swap_in", c.key))]
            in_wait = position[("Wait", Transfer("swap_in", c.key))]
            assert out_wait < in_issue < in_wait


def test_just_in_time_prefetch_is_never_late_without_contention():
    p = layered_problem(layers=6)
    d = schedule_swaps(p, {c.key: swap_all(p, FAST, None).decisions[c.key] for c in p.candidates}, FAST)
    plan_pred = program_for(p, d, FAST)
    from lohan_compile.plan.simulate import simulate

    t = simulate(plan_pred)
    # late only where it could not start earlier: the first thing backward needs
    for c in p.candidates:
        if d[c.key].prefetch_at > p.n_fw:
            assert math.isclose(t.exposed[Transfer("swap_in", c.key)], 0.0, abs_tol=1e-9)
    assert sum(1 for c in p.candidates if d[c.key].prefetch_at > p.n_fw) >= len(p.candidates) - 2


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(2, 6),
    weight=st.integers(1, 400),
    rate=st.sampled_from([1e-6, 1e-3, 1e-2]),
)
def test_streamed_weights_are_fetched_in_time_on_the_h2d_link_and_counted(layers, weight, rate):
    """Each layer's weight, streamed, is fetched once per phase: issued within its phase and
    before its first use, on the h2d link beside the swap-ins, its bytes on the device from
    issue to last use; not resident."""
    from dataclasses import replace

    from lohan_compile.plan.program import predict
    from lohan_compile.plan.schedule import schedule_fetches
    from lohan_compile.plan.problem import Fetch

    p = layered_problem(layers=layers)
    p.resident_bytes = 50  # the streamed weights are not resident
    n = 2 * layers
    p.fetches = [Fetch(i, "fw", weight, i, i) for i in range(layers)] + [
        Fetch(i, "bw", weight, n - 1 - i, n - 1 - i) for i in range(layers)]
    rates = Rates(d2h_seconds_per_byte=rate, h2d_seconds_per_byte=rate)
    p.fetches = schedule_fetches(p, rates)
    for f in p.fetches:
        floor = 0 if f.phase == "fw" else p.n_fw
        assert floor <= f.issue_at <= f.first_use
    keep = {c.key: keep_all(p, rates, None).decisions[c.key] for c in p.candidates}
    pred = predict(p, keep, rates)
    assert pred.h2d_bytes == 2 * layers * weight
    # the device holds at least one weight beside what keep-all keeps, never all of them at once
    # unless the link forces early fetches
    no_stream = replace(p, fetches=[])
    base = predict(no_stream, keep, rates).peak_device_bytes
    assert base + weight <= pred.peak_device_bytes <= base + 2 * layers * weight
    if rate == 1e-6:  # a fast link: fetches hide behind compute, just in time
        assert pred.step_seconds == pytest.approx(predict(no_stream, keep, rates).step_seconds, abs=1e-3)
        assert pred.peak_device_bytes <= base + 2 * weight


def test_outputs_dropped_before_backward_are_freed_when_forward_ends():
    """Forward outputs are held through the step unless the runtime saw them dropped; one
    still held keeps a storage it shares with a dropped one; the problem asked is unchanged."""
    from lohan_compile.plan.program import predict

    ops = [OpInfo(f"op{i}", 1e-3, "fw" if i < 2 else "bw") for i in range(4)]
    buffers = {
        "fw:a": Buffer("fw:a", 100, 0, None),  # output 0, alone in its storage
        "fw:b": Buffer("fw:b", 10, 1, None),  # outputs 1 and 2: views of one storage
    }
    p = Problem(ops=ops, n_fw=2, buffers=buffers, candidates=[],
                user_outputs={0: ("fw:a", 1), 1: ("fw:b", 1), 2: ("fw:b", 1)})
    rates = Rates(d2h_seconds_per_byte=1e-9, h2d_seconds_per_byte=1e-9)
    assert predict(p, {}, rates).peak_device_bytes == 110
    q = p.without_outputs(frozenset({0, 1, 7}))  # 7: not an output it watches
    assert q.dropped_outputs == {0, 1}
    assert q.buffers["fw:a"].free == 1 and q.buffers["fw:b"].free is None  # output 2 holds it
    assert p.buffers["fw:a"].free is None and p.dropped_outputs == frozenset()
    assert p.without_outputs(frozenset({0, 1, 2})).buffers["fw:b"].free == 1
    # held again: planned as held again
    assert p.without_outputs(frozenset({0})).without_outputs(frozenset()).buffers["fw:a"].free is None
    assert predict(q, {}, rates).peak_device_bytes == 110  # both live while forward runs
    program_end = predict(q, {}, rates).timeline.curves["device"][-1][1]
    assert program_end == 10
